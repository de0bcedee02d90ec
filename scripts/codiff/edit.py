"""Edit a real image with a collaboration: Imagic per modality, then collaborate (the released
``editing/imagic_edit_{text,mask}.py`` + ``collaborative_edit.py`` in one command)::

    python scripts/codiff/edit.py --config configs/codiff/edit_tiny.yaml \\
        --input_image_path data/digits/test/images/00000.png --mask_path data/digits/test/masks/00000.png \\
        --text_prompt "a blue handwritten seven" --save_folder outputs/codiff_edit

For each modality, stage A optimises the target condition's tokens to reconstruct the input (model frozen),
stage B fine-tunes a copy of that member's UNet on the optimised tokens; then the fine-tuned members collaborate
through the unchanged dynamic diffusers with ``alpha e_tgt + (1 - alpha) e_opt`` for every alpha (0 reconstructs,
1 is the target, > 1 extrapolates). Every alpha starts from the same noise.

Writes ``<save_folder>/<image name>/``: ``input.png``, ``{idx:06d}_x_0_{k}_alpha={alpha}.png`` (the collaborative
edits, as released), with ``--save_unimodal`` also ``{modality}_only/...`` (each fine-tuned member alone), and
``edit.json`` (settings, Imagic losses). ``--save_checkpoint`` adds ``imagic/`` (optimised/target tokens and the
fine-tuned UNets, safetensors; a concat mask member as unet/ + mask_encoder/). Defaults are the release's (500 + 1000 iterations); the digits config is shorter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

from common.errors import UserError, cli_entry, one_line  # noqa: E402
from common.methods import add_flag  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML of flag defaults (command-line flags win)")
    add_flag(p, "--checkpoint", "--model_dir", dest="model_dir", default="ckpt/tiny/codiff",
             help="collaboration checkpoint folder (codiff.json)")
    p.add_argument("--input_image_path", default=None, help="the real image to edit (the model's resolution)")
    p.add_argument("--text_prompt", default=None, help="target text (for the text member)")
    p.add_argument("--mask_path", default=None, help="target mask (for the mask member; the input's own keeps layout)")
    p.add_argument("--save_folder", default="outputs/codiff_edit")
    p.add_argument("--stage1_lr", type=float, default=1e-3, help="Imagic stage A (embedding) learning rate")
    p.add_argument("--stage1_num_iter", type=int, default=500)
    p.add_argument("--stage2_lr", type=float, default=1e-6, help="Imagic stage B (UNet fine-tune) learning rate")
    p.add_argument("--stage2_num_iter", type=int, default=1000)
    p.add_argument("--alpha_list", default="0,0.125,0.25,0.375,0.5,0.625,0.75,0.875,1,1.125,1.25,1.5,2,2.5",
                   help="comma-separated interpolation weights of the target tokens")
    add_flag(p, "--num_inference_steps", "--ddim_steps", dest="ddim_steps", type=int, default=None,
             help="DDIM steps (default: the checkpoint's, 50)")
    p.add_argument("--eta", type=float, default=None, help="default: the checkpoint's (1.0)")
    p.add_argument("--guidance_scale", type=float, default=1.0, help="per-member CFG (extension; 1 = the paper)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the Imagic stages")
    p.add_argument("--sample_seed", type=int, default=2, help="seed of the sampling noise (the release's 2)")
    p.add_argument("--save_unimodal", action=argparse.BooleanOptionalAction, default=False,
                   help="also sample each fine-tuned member alone at every alpha")
    p.add_argument("--save_checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="save the tokens and fine-tuned UNets under imagic/")
    p.add_argument("--device", default="cpu")
    return p


def parse_alphas(text: str) -> tuple[float, ...]:
    try:
        alphas = tuple(float(a) for a in str(text).split(",") if a.strip())
    except ValueError:
        raise UserError(f"--alpha_list {text!r} is not a comma-separated list of numbers") from None
    if not alphas:
        raise UserError("--alpha_list is empty")
    return alphas


def load_input_image(path: str, size: int):
    import numpy as np
    import torch

    from common.io import load_image_rgb

    try:
        image = load_image_rgb(path)
    except OSError as err:
        raise UserError(f"cannot read --input_image_path {path} ({one_line(str(err))})") from None
    if image.size != (size, size):
        raise UserError(f"--input_image_path {path} is {image.size[0]}x{image.size[1]} but the model makes {size}x{size} "
                        "images: resize (and crop) it first")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


@cli_entry
def main(argv=None) -> int:
    from codiff.checkpoint import load_collaboration
    from codiff.conditions import load_mask
    from codiff.edit import edit_image
    from codiff.pipeline import safe_dirname
    from common import limits
    from common.io import atomic_write_dir, require_file, save_safetensors, to_pil
    from common.train import parse_args_with_config

    args = limits.check_namespace(parse_args_with_config(build_parser(), argv))
    if not args.input_image_path:
        raise UserError("--input_image_path is required: the image to edit")
    require_file(args.input_image_path, "--input_image_path")
    for flag in ("stage1_num_iter", "stage2_num_iter", "batch_size"):
        if getattr(args, flag) < (1 if flag == "batch_size" else 0):
            raise UserError(f"--{flag} must be >= {1 if flag == 'batch_size' else 0}")
    alphas = parse_alphas(args.alpha_list)
    collab = load_collaboration(args.model_dir, device=args.device)
    mask_name, text_name = collab.modality_of_kind("mask"), collab.modality_of_kind("text")
    if args.mask_path and mask_name is None:
        raise UserError(f"--mask_path was given but the checkpoint has no mask model ({', '.join(collab.modalities)})")
    if args.text_prompt is not None and text_name is None:
        raise UserError(f"--text_prompt was given but the checkpoint has no text model ({', '.join(collab.modalities)})")
    targets = {}
    if mask_name:
        if not args.mask_path:
            raise UserError("the mask member needs its target: pass --mask_path (the input's own mask keeps the layout)")
        targets[mask_name] = load_mask(args.mask_path, collab.mask_format)
    if text_name:
        if not (args.text_prompt or "").strip():
            raise UserError("the text member needs its target: pass --text_prompt")
        targets[text_name] = args.text_prompt
    image = load_input_image(args.input_image_path, collab.image_size)
    sampling = collab.sampling
    steps = args.ddim_steps or int(sampling.get("ddim_steps", 50))
    eta = args.eta if args.eta is not None else float(sampling.get("eta", 1.0))
    out = edit_image(collab, image, targets, stage1_steps=args.stage1_num_iter, stage1_lr=args.stage1_lr,
                     stage2_steps=args.stage2_num_iter, stage2_lr=args.stage2_lr, alphas=alphas,
                     num_inference_steps=steps, eta=eta, batch_size=args.batch_size, seed=args.seed,
                     sample_seed=args.sample_seed, guidance_scale=args.guidance_scale, unimodal=args.save_unimodal,
                     progress=False)
    folder = Path(args.save_folder) / safe_dirname(Path(args.input_image_path).stem)
    with atomic_write_dir(folder, "--save_folder") as tmp:
        to_pil(image[0]).save(tmp / "input.png")

        def write(images_by_alpha, sub):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
            for k, (alpha, images) in enumerate(images_by_alpha.items()):
                for idx, img in enumerate(images):
                    to_pil(img, value_range=(0, 1)).save(tmp / sub / f"{idx:06d}_x_0_{k}_alpha={alpha:g}.png")

        write(out.collaborative, ".")
        for name, by_alpha in out.unimodal.items():
            write(by_alpha, f"{name}_only")
        if args.save_checkpoint:
            (tmp / "imagic").mkdir()
            for name, r in out.edits.items():
                save_safetensors({"e_tgt": r.e_tgt, "e_opt": r.e_opt}, tmp / "imagic" / f"{name}_tokens.safetensors")
                r.unet.save_pretrained(tmp / "imagic" / f"{name}_unet", safe_serialization=True)
            save_safetensors({"x_T": out.x_T, "z_0": out.input_latent}, tmp / "imagic" / "start.safetensors")
        summary = {**vars(args), "ddim_steps": steps, "eta": eta, "alphas": list(alphas),
                   "imagic": {n: {"stage1_first_last": [r.losses_a[:1], r.losses_a[-1:]],
                                  "stage2_first_last": [r.losses_b[:1], r.losses_b[-1:]]} for n, r in out.edits.items()}}
        (tmp / "edit.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {len(alphas)} collaborative edits to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
