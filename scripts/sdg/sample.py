"""Semantic diffusion guidance (SDG): sample a frozen unconditional model steered by language and/or image guidance.

    python scripts/sdg/sample.py --checkpoint ckpt/tiny/sdg --clip_path ckpt/tiny/sdg/clip \\
        --text_weight 1000 --text_instruction_file instructions.txt --exp_name sevens
    python scripts/sdg/sample.py --checkpoint lsun_bedroom.pt --image_size 256 --num_channels 256 \\
        --num_res_blocks 2 --attention_resolutions 32,16,8 --num_head_channels 64 --resblock_updown True \\
        --use_scale_shift_norm True --learn_sigma True --clip_path models/sdg_clip_bedroom \\
        --data_dir ref/ref_bedroom --image_weight 100 --timestep_respacing 100 --exp_name bedroom_semantic

Flags keep the names of SDG's ``scripts/sample.py``. Guidance: ``--text_weight`` x
cos(E'(x_t, t), T(instruction)) with one instruction per line of ``--text_instruction_file``; ``--image_weight`` x
the content cosine (``--image_loss semantic``) or the Gram-style energy (``--image_loss style``) against each image of
``--data_dir`` noised to the same t. Both weights default to 0 (the released defaults of 1.0 silently guided).
For each reference x each instruction, ``--num_batches`` batches of ``--batch_size`` are drawn; batch b starts from
the same noise (seed ``--seed + b``) in every folder, so folders are paired comparisons.

Writes ``<out_root>/<exp_name>/<folder>/<NNNNN>.png`` with folder ``%05d_<reference>`` (image guidance),
``%05d_<instruction>`` (language), ``%05d_%05d_<reference>_<instruction>`` (both) or ``00000_unguided``, names made
filesystem-safe; NNNNN counts over the whole run; plus ``meta.json`` (every flag, folder -> guidance). The run folder
appears only when complete. ``--model_path``: an SDG folder (``unet/`` + ``adm_flags.json``: its flags win) or a
guided-diffusion ``.pt`` described by the model flags (loaded ``weights_only``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent.parent

from common.errors import UserError, cli_entry  # noqa: E402
from common.limits import add_memory_argument  # noqa: E402
from common.methods import add_flag  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from sdg.adm import add_adm_arguments, str2bool
    from sdg.scores import GRAM_MODES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_flag(p, "--checkpoint", "--model_path", dest="model_path", default=str(REPO / "ckpt" / "tiny" / "sdg"),
             help="SDG folder (unet/ + adm_flags.json) or a guided-diffusion .pt (then give the model flags)")
    p.add_argument("--clip_path", default=None,
                   help="noise-aware CLIP folder (scripts/sdg/finetune_clip.py); required when a weight is non-zero")
    p.add_argument("--text_weight", type=float, default=0.0, help="language guidance weight (SDG README: 160)")
    p.add_argument("--image_weight", type=float, default=0.0, help="image guidance weight (SDG README: 100)")
    p.add_argument("--image_loss", default="semantic", choices=("semantic", "style"),
                   help="semantic: content cosine; style: Gram matrices of the encoder's feature maps")
    p.add_argument("--style_gram", default="per_sample", choices=GRAM_MODES,
                   help="per_sample (ours) or batch (the released Gram that mixes the samples of a batch)")
    p.add_argument("--text_instruction_file", default=None, help="text file, one instruction per line")
    p.add_argument("--data_dir", default=None, help="folder of reference images (searched recursively)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_batches", type=int, default=1, help="batches per (reference, instruction)")
    p.add_argument("--clip_denoised", type=str2bool, default=True, help="clamp x0_hat to [-1, 1] at every step")
    p.add_argument("--use_ddim", type=str2bool, default=False,
                   help="DDIM (eta 0) with the same guidance as a score shift (ignored by the released code)")
    p.add_argument("--exp_name", default=None, help="name of the run folder (required)")
    p.add_argument("--out_root", default="results", help="where <exp_name>/ is written")
    p.add_argument("--seed", type=int, default=2)
    add_memory_argument(p)
    p.add_argument("--guidance_seed", type=int, default=None,
                   help="seed of the reference noise (default: --seed + 1000003); kept apart from the sampler's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_progress", action="store_true")
    adm = p.add_argument_group("ADM model flags (for a guided-diffusion .pt; a model folder brings its own)")
    add_adm_arguments(adm)
    p.set_defaults(timestep_respacing=None)  # None: the folder's adm_flags.json, else SDG's README value "100"
    return p


def safe_name(text: str, limit: int = 80) -> str:
    """A folder-name-safe rendering of an instruction or file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return (name or "empty")[:limit]


def check_args(args) -> None:
    """Every input problem found before a model is loaded or anything is written."""
    if not args.exp_name:
        raise UserError("--exp_name is required: the run folder <out_root>/<exp_name> to write")
    if args.batch_size < 1 or args.num_batches < 1:
        raise UserError(f"--batch_size and --num_batches must be >= 1 (got {args.batch_size}, {args.num_batches})")
    if (args.text_weight or args.image_weight) and not args.clip_path:
        raise UserError("a guidance weight is non-zero but no --clip_path was given: pass the noise-aware CLIP folder "
                        "(scripts/sdg/finetune_clip.py) or set --text_weight 0 --image_weight 0")
    if args.text_weight and not args.text_instruction_file:
        raise UserError("--text_weight is non-zero but no --text_instruction_file was given")
    if args.image_weight and not args.data_dir:
        raise UserError("--image_weight is non-zero but no --data_dir of reference images was given")


def model_flags(args):
    from dataclasses import fields

    from sdg.adm import ADMFlags

    values = {f.name: getattr(args, f.name) for f in fields(ADMFlags)}
    values["timestep_respacing"] = args.timestep_respacing or "100"
    return ADMFlags.from_dict(values)


def folder_name(ref_index: int, text_index: int, reference, instruction) -> str:
    """SDG's folder names, made filesystem-safe."""
    if reference is not None and instruction is not None:
        return f"{ref_index:05d}_{text_index:05d}_{safe_name(reference.stem)}_{safe_name(instruction)}"
    if reference is not None:
        return f"{ref_index:05d}_{safe_name(reference.stem)}"
    if instruction is not None:
        return f"{text_index:05d}_{safe_name(instruction)}"
    return "00000_unguided"


@cli_entry
def main(argv=None) -> int:
    import torch

    from common import limits
    from common.io import atomic_write_dir, check_output_dir, to_pil
    from sdg.adm import noise_schedule
    from sdg.checkpoint import load_diffusion_model, load_noise_aware_clip_folder
    from sdg.data import list_reference_images, load_reference, read_instructions
    from sdg.pipeline import sample_sdg
    from sdg.sample_cli import plan_memory

    args = limits.check_namespace(build_parser().parse_args(argv))
    check_args(args)
    instructions = read_instructions(args.text_instruction_file) if args.text_weight else [None]
    references = list_reference_images(args.data_dir) if args.image_weight else [None]
    if args.text_instruction_file and not args.text_weight:
        print("note: --text_instruction_file is ignored because --text_weight is 0", file=sys.stderr)
    if args.data_dir and not args.image_weight:
        print("note: --data_dir is ignored because --image_weight is 0", file=sys.stderr)
    out = Path(args.out_root) / args.exp_name
    check_output_dir(out, "--out_root/--exp_name")  # refuse a folder we may not write before sampling

    unet, flags = load_diffusion_model(args.model_path, model_flags(args), device=args.device)
    respacing = args.timestep_respacing or flags.timestep_respacing or "100"
    schedule = noise_schedule(flags)
    bundle = load_noise_aware_clip_folder(args.clip_path, args.device) if args.clip_path else None
    size = unet.config.sample_size
    # SDG's own estimate (UNet step, the CLIP's guidance gradient; common.memory): one line when a batch cannot fit.
    # A batch shares one generator here, so it is never split (that would change its noise).
    plan_memory(unet, bundle.clip if bundle else None, args.batch_size, guided=bool(args.text_weight or args.image_weight),
                max_memory_gb=args.max_memory_gb, fixed_chunk=True, chunk=args.batch_size, what="--batch_size")
    guidance_seed = args.seed + 1000003 if args.guidance_seed is None else args.guidance_seed
    texts = {i: bundle.encode_text([i]) for i in instructions if i is not None} if bundle else {}

    meta = {"flags": vars(args), "model_flags": flags.to_dict(), "timestep_respacing": respacing, "folders": {}}
    counter, start = 0, time.time()
    with atomic_write_dir(out, "--out_root/--exp_name") as tmp:
        folders = 0
        for ref_index, reference in enumerate(references):
            ref = load_reference(reference, size).to(args.device) if reference is not None else None
            for text_index, instruction in enumerate(instructions):
                name = folder_name(ref_index, text_index, reference, instruction)
                (tmp / name).mkdir()
                meta["folders"][name] = {"reference": None if reference is None else str(reference),
                                         "instruction": instruction}
                for b in range(args.num_batches):
                    x = sample_sdg(
                        unet, schedule, respacing, batch_size=args.batch_size,
                        clip=bundle.clip if bundle else None, text_embedding=texts.get(instruction),
                        reference=ref, text_weight=args.text_weight if instruction is not None else 0.0,
                        content_weight=args.image_weight if args.image_loss == "semantic" and ref is not None else 0,
                        style_weight=args.image_weight if args.image_loss == "style" and ref is not None else 0,
                        style_gram=args.style_gram, generator=torch.Generator().manual_seed(args.seed + b),
                        guidance_generator=torch.Generator().manual_seed(guidance_seed + b),
                        clip_x0=1.0 if args.clip_denoised else None, device=args.device,
                        progress=not args.no_progress, sampler="ddim" if args.use_ddim else "ddpm",
                    )
                    for image in x:
                        to_pil(image.cpu()).save(tmp / name / f"{counter:05d}.png")
                        counter += 1
                    print(f"{name}: batch {b + 1}/{args.num_batches} done, {time.time() - start:.1f} s elapsed")
                folders += 1
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    print(f"wrote {counter} images in {folders} folder(s) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
