"""Quality of the shipped tiny towers on the digits test split: VAE reconstruction, CLIP zero-shot digit/colour.

``python bench/bench_tiny_towers.py`` (needs ckpt/tiny/vae and ckpt/tiny/clip).
"""

from __future__ import annotations

from pathlib import Path

import torch


REPO = Path(__file__).resolve().parent.parent

from common.data import image_text_dataset  # noqa: E402
from common.digits import COLORS, DIGIT_WORDS, build_digits, caption  # noqa: E402


@torch.no_grad()
def vae_scores(test):
    from common.models import load_vae

    vae = load_vae(REPO / "ckpt/tiny/vae").float().eval()
    pixels = torch.stack([test[i]["pixel_values"] for i in range(len(test))])
    recon = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.clamp(-1, 1)
    mse = float(((recon - pixels) ** 2).mean())
    psnr = float(10 * torch.log10(torch.tensor(4.0) / mse))  # peak-to-peak 2 in [-1, 1]
    return mse, psnr


@torch.no_grad()
def clip_zero_shot(test):
    import open_clip

    from common.models import load_open_clip

    model, _, tokenizer = load_open_clip(REPO / "ckpt/tiny/clip")
    model = model.float().eval()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pixels = torch.stack([test[i]["pixel_values"] for i in range(len(test))])
    img = model.encode_image(((pixels + 1) / 2 - mean) / std)
    img = img / img.norm(dim=-1, keepdim=True)
    digits = torch.tensor([test[i]["digit"] for i in range(len(test))])
    names = list(COLORS)
    colors = torch.tensor([names.index(test[i]["color"]) for i in range(len(test))])
    # digit: average the text embedding over colours; colour: average over digits (prompt ensembling)
    emb = model.encode_text(tokenizer([caption(d, c) for d in range(10) for c in names])).view(10, len(names), -1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    digit_pred = (img @ emb.mean(1).T).argmax(1)
    color_pred = (img @ emb.mean(0).T).argmax(1)
    joint = (img @ emb.view(10 * len(names), -1).T).argmax(1)
    both = float(((joint // len(names) == digits) & (joint % len(names) == colors)).float().mean())
    return float((digit_pred == digits).float().mean()), float((color_pred == colors).float().mean()), both


def main():
    from records import write_records

    data = build_digits(REPO / "data" / "digits")
    test = image_text_dataset(data / "test", 32)
    mse, psnr = vae_scores(test)
    d, c, both = clip_zero_shot(test)
    print(f"VAE test MSE {mse:.5f} (PSNR {psnr:.1f} dB); CLIP zero-shot digit {d:.3f} colour {c:.3f} both {both:.3f}"
          f" (chance {1 / len(DIGIT_WORDS):.2f} / {1 / len(COLORS):.2f})")
    command, section = "python bench/bench_tiny_towers.py", "tiny towers on digits"
    write_records([
        dict(name="tiny VAE: reconstruction MSE on the digits test split (pixels in [-1, 1])", value=round(mse, 6),
             unit="mse", target="", command=command, section=section),
        dict(name="tiny VAE: reconstruction PSNR on the digits test split", value=round(psnr, 2), unit="dB",
             target="", command=command, section=section),
        dict(name="tiny CLIP: zero-shot digit accuracy (test split, 10-way)", value=round(d, 4), unit="acc",
             target="", command=command, section=section),
        dict(name="tiny CLIP: zero-shot colour accuracy (test split, 6-way)", value=round(c, 4), unit="acc",
             target="", command=command, section=section),
        dict(name="tiny CLIP: zero-shot digit+colour accuracy (test split, 60-way)", value=round(both, 4),
             unit="acc", target="", command=command, section=section),
    ])


if __name__ == "__main__":
    main()
