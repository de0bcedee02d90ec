"""Quality of the digits-pairs towers (ckpt/tiny/pairs/): VAE reconstruction, CLIP retrieval, the baseline's judge.

    python scripts/make_digits_pairs.py --output_dir data/digits_pairs
    OMP_NUM_THREADS=1 python bench/bench_pairs_towers.py [--towers ckpt/tiny/pairs] [--n 300] [--no_write]

- VAE: mean squared error and PSNR of reconstructions of the held-out test pairs (pixels in [-1, 1]), and the pair
  judge's both-correct rate on the originals and on their reconstructions (what the latent space can still say).
  The digits VAE (``ckpt/tiny/vae``) is measured alike for comparison.
- CLIP: text -> image top-1 retrieval among 100 test pairs (chance 1 %), and how often the true caption beats the
  same caption with the two colours swapped (binding; chance 50 %).
- Baseline: ``pair_prompts(n)`` (every (left, right) digit pair, all ordered colour pairs), x_T from seed 0, 25 DDIM
  steps, CFG 3, judged per half: digit and colour per position, colour binding, and the whole prompt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


REPO = Path(__file__).resolve().parent.parent
SECTION = "digits-pairs: tiny towers and baseline"


def to_uint8(pixels: torch.Tensor) -> list[np.ndarray]:
    """``[N, 3, H, W]`` in [-1, 1] -> uint8 HWC arrays."""
    return [np.round(((p.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy() * 255).astype(np.uint8) for p in pixels]


@torch.no_grad()
def vae_scores(vae_path: Path, pixels: torch.Tensor, targets) -> dict:
    from common.judge import judge_pair_images
    from common.models import load_vae

    vae = load_vae(vae_path).float().eval()
    recon = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1)
                       for chunk in pixels.split(100)])
    mse = float(((recon - pixels) ** 2).mean())
    return {"mse": mse, "psnr": float(10 * np.log10(4.0 / mse)),
            "both_after_recon": judge_pair_images(to_uint8(recon), targets)["both_accuracy"]}


@torch.no_grad()
def clip_scores(clip_path: Path, pixels: torch.Tensor, rows: list[dict]) -> dict:
    import open_clip

    from common.digits_pairs import pair_caption
    from common.models import load_open_clip

    model, _, tokenizer = load_open_clip(clip_path)
    model = model.float().eval()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    images = model.encode_image(((pixels[:100] + 1) / 2 - mean) / std)
    images = images / images.norm(dim=-1, keepdim=True)

    def text(captions):
        t = model.encode_text(tokenizer(captions))
        return t / t.norm(dim=-1, keepdim=True)

    true = text([r["text"] for r in rows[:100]])
    top1 = float(((true @ images.T).argmax(1) == torch.arange(100)).float().mean())
    swapped = text([pair_caption(r["left_digit"], r["right_color"], r["right_digit"], r["left_color"])
                    for r in rows[:100]])
    binding = float(((images * true).sum(1) > (images * swapped).sum(1)).float().mean())
    return {"text_to_image_top1": top1, "colour_swap_binding": binding}


def baseline_scores(folder: Path, n: int) -> dict:
    from common.digits_pairs import pair_prompts
    from common.judge import judge_pair_images
    from contextdiff.checkpoint import load_contextdiff
    from contextdiff.sample_cli import EVAL_SAMPLING, sample

    start = time.perf_counter()
    rows = pair_prompts(n)
    model = load_contextdiff(folder, require_adapter=False)
    images = sample(model, [r["text"] for r in rows], steps=EVAL_SAMPLING["steps"],
                    guidance_scale=EVAL_SAMPLING["guidance_scale"], seed=0, no_shift=True, chunk=100)
    arrays = [np.round(im.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8) for im in images]
    scores = judge_pair_images(arrays, [(r["left_digit"], r["left_color"], r["right_digit"], r["right_color"])
                                        for r in rows])
    from torchvision.utils import save_image

    out = REPO / "outputs" / "bench_pairs_towers"
    out.mkdir(parents=True, exist_ok=True)
    save_image(images[:100], out / "baseline_grid.png", nrow=10)
    scores["seconds"] = round(time.perf_counter() - start, 1)
    return scores


def main(argv=None) -> None:
    from records import write_records  # bench/records.py: this script's folder is on sys.path

    from common.data import image_text_dataset
    from common.judge import read_metadata

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--towers", default="ckpt/tiny/pairs")
    p.add_argument("--data_dir", default="data/digits_pairs/test")
    p.add_argument("--n", type=int, default=300, help="baseline prompts")
    p.add_argument("--no_write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    towers, data = REPO / args.towers, REPO / args.data_dir
    test = image_text_dataset(data, resolution=32)
    rows = read_metadata(data)
    pixels = torch.stack([test[i]["pixel_values"] for i in range(len(test))])
    targets = [(r["left_digit"], r["left_color"], r["right_digit"], r["right_color"]) for r in rows]
    from common.judge import judge_pair_images

    original = judge_pair_images(to_uint8(pixels), targets)["both_accuracy"]
    command = "OMP_NUM_THREADS=1 python bench/bench_pairs_towers.py " + " ".join(argv or [])
    records = [dict(name=f"pair judge both-correct on the {len(rows)} real test pairs as rendered",
                    value=round(100 * original, 1), unit="%", command=command, section=SECTION)]
    for label, path in (("pairs VAE (ckpt/tiny/pairs/vae)", towers / "vae"), ("digits VAE (ckpt/tiny/vae)",
                                                                               REPO / "ckpt/tiny/vae")):
        s = vae_scores(path, pixels, targets)
        print(f"{label}: MSE {s['mse']:.4f}, PSNR {s['psnr']:.1f} dB, both-correct after recon "
              f"{s['both_after_recon']:.3f}")
        records.append(dict(name=f"{label} on {len(rows)} test pairs: reconstruction MSE ([-1, 1] pixels) / PSNR / "
                                 "judged both-correct after reconstruction",
                            value=f"{s['mse']:.4f} / {s['psnr']:.1f} dB / {100 * s['both_after_recon']:.1f} %",
                            unit="", command=command, section=SECTION))
    c = clip_scores(towers / "clip", pixels, rows)
    print(f"pairs CLIP: text->image top-1 {c['text_to_image_top1']:.2f}, colour-swap binding "
          f"{c['colour_swap_binding']:.2f}")
    records.append(dict(name="pairs CLIP (ckpt/tiny/pairs/clip) on 100 test pairs: text->image top-1 (chance 0.01) / "
                             "true caption beats the colour-swapped one (chance 0.5)",
                        value=f"{c['text_to_image_top1']:.2f} / {c['colour_swap_binding']:.2f}", unit="",
                        command=command, section=SECTION))
    if (towers / "baseline").is_dir():
        b = baseline_scores(towers / "baseline", args.n)
        print({k: v for k, v in b.items() if k != "predicted"})
        records.append(dict(
            name=f"pairs baseline (ckpt/tiny/pairs/baseline), {args.n} pair prompts, seed 0, 25 DDIM steps, CFG 3: "
                 "judged left digit / right digit / left colour / right colour / colour binding / whole prompt",
            value=" / ".join(f"{100 * b[k]:.1f}" for k in ("left_digit_accuracy", "right_digit_accuracy",
                                                           "left_color_accuracy", "right_color_accuracy",
                                                           "binding_accuracy", "both_accuracy")),
            unit="%", command=command, section=SECTION))
    if not args.no_write:
        write_records(records)


if __name__ == "__main__":
    main()
