"""Generate from a mask and a text with a collaboration (the released ``generate.py``)::

    python scripts/codiff/generate.py --mask_path data/digits/test/masks/00000.png \\
        --input_text "a red handwritten seven" --batch_size 4 --ddim_steps 50 --seed 0 \\
        --save_z --return_influence_function --display_x_inter --save_mixed

Writes ``<save_folder>/<mask name>/<prompt>/`` (the prompt made path-safe), replaced atomically:

- ``<mask name>.png``: the mask rendered in its palette;
- ``{idx:06d}_x_0.png``: the sample, ``R x R`` RGB (R = the model's resolution, 32 for the digits world);
- ``--return_influence_function``: ``{idx:06d}_{modality}_influence_function.png``, one grid per modality of the
  influence maps of every step (S tiles of ``h*map_upscale`` px, 10 per row, white = weight 1);
- ``--display_x_inter``: ``{idx:06d}_x_inter.png`` / ``{idx:06d}_pred_x0.png``, the decoded latent after every step
  and the decoded x0 prediction of every step (S tiles of ``R`` px, 10 per row);
- ``--save_z``: ``{idx:06d}_z_0.png``, the final latent's C channels side by side (``h`` px tiles);
- ``--save_mixed``: ``{idx:06d}_mixed.png``, the sample blended with the mask (alpha 0.3);
- ``settings.json``: every flag and the timesteps.

The flags are real booleans (``--save_z`` / ``--no-save_z``); the released re-weighting is ``--released_reweighting``.
Bad input (a mask with ids outside the palette or of the wrong size, a condition for a modality the checkpoint
has no model for, a missing condition) is one line on stderr and exit 2; an over-long prompt is truncated with a
warning.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

from common.errors import UserError, cli_entry, one_line  # noqa: E402


def needed_modalities(collab, weighting: str) -> list[str]:
    from codiff.variants import variant_weights

    kinds = {name: m.kind for name, m in collab.members.items()}
    weights = variant_weights(weighting, collab.modalities, kinds)
    return list(collab.modalities) if weights is None else [n for n, w in weights.items() if w > 0]


def gather_conditions(args, collab) -> tuple[dict, object, str]:
    """``(raw conditions by modality, mask ids or None, mask name)``; UserError for a condition without its model
    or a model without its condition."""
    from codiff.conditions import load_mask

    mask_name = collab.modality_of_kind("mask")
    text_name = collab.modality_of_kind("text")
    if args.mask_path and mask_name is None:
        raise UserError(f"--mask_path was given but the checkpoint {args.model_dir} has no mask model (modalities: "
                        f"{', '.join(collab.modalities)}): pass a checkpoint with a mask member or drop --mask_path")
    if args.input_text is not None and text_name is None:
        raise UserError(f"--input_text was given but the checkpoint {args.model_dir} has no text model (modalities: "
                        f"{', '.join(collab.modalities)}): pass a checkpoint with a text member or drop --input_text")
    conditions, ids = {}, None
    if args.mask_path:
        ids = load_mask(args.mask_path, collab.members[mask_name].mask_format)
        conditions[mask_name] = ids
    if args.input_text is not None:
        if not args.input_text.strip():
            raise UserError("--input_text is empty: write the text to generate from")
        conditions[text_name] = args.input_text
    for name in needed_modalities(collab, args.weighting):
        if name not in conditions:
            flag = "--mask_path" if collab.members[name].kind == "mask" else "--input_text"
            raise UserError(f"the {name!r} model needs its condition: pass {flag} (or --weighting "
                            f"{'text_only' if collab.members[name].kind == 'mask' else 'mask_only'} to leave it out)")
    stem = Path(args.mask_path).stem if args.mask_path else "no_mask"
    return conditions, ids, stem


def check_args(args) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.ddim_steps is not None and args.ddim_steps < 1:
        raise UserError(f"--num_inference_steps must be >= 1, got {args.ddim_steps}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must lie in [0, 1], got {args.eta}")
    if args.map_upscale < 1:
        raise UserError(f"--map_upscale must be >= 1, got {args.map_upscale}")


@cli_entry
def main(argv=None) -> int:
    import torch

    from codiff.checkpoint import load_collaboration
    from codiff.cli import generate_parser, reweighting_from_args
    from codiff.conditions import mask_to_rgb
    from codiff.pipeline import safe_dirname, save_generation
    from codiff.variants import variant_weights
    from common import limits
    from common.io import atomic_write_dir
    from common.train import parse_args_with_config

    parser = generate_parser()
    parser.description = __doc__.split("\n\n")[0]
    args = limits.check_namespace(parse_args_with_config(parser, argv))
    check_args(args)
    collab = load_collaboration(args.model_dir, device=args.device)
    sampling = collab.sampling
    steps = args.ddim_steps or int(sampling.get("ddim_steps", 50))
    eta = args.eta if args.eta is not None else float(sampling.get("eta", 1.0))
    scale = args.guidance_scale if args.guidance_scale is not None else float(sampling.get("guidance_scale", 1.0))
    weights = variant_weights(args.weighting, collab.modalities, {n: m.kind for n, m in collab.members.items()})
    record = args.return_influence_function or args.display_x_inter
    pipe = collab.pipeline()
    # the collaboration's own estimate (common.memory), before any condition is read: one line when even its most
    # frugal path does not fit; otherwise the pipeline takes the fastest path that does
    active = None if weights is None else [n for n, w in weights.items() if float(w) > 0]
    pipe.memory_plan(args.batch_size, guided=list(active or collab.modalities) if scale != 1.0 else [], active=active,
                     steps=steps, record=record, max_memory_gb=args.max_memory_gb, what="--batch_size")
    conditions, ids, mask_stem = gather_conditions(args, collab)
    reweighting = reweighting_from_args(args, sampling)
    if reweighting is not None and weights is not None:
        raise UserError("--released_reweighting / --mask_schedule re-weight the learned maps: use them with "
                        "--weighting collaborative")
    uncond, scales = None, None
    if scale != 1.0:
        uncond = {n: collab.members[n].null_tokens(1) for n in conditions}
        scales = {n: scale for n in conditions}
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        gen = pipe(conditions, batch_size=args.batch_size, num_inference_steps=steps, eta=eta, generator=generator,
                   reweighting=reweighting, uncond=uncond, guidance_scales=scales, record=record, weights=weights,
                   max_memory_gb=args.max_memory_gb)
    for w in caught:
        print(f"warning: {one_line(str(w.message))}", file=sys.stderr)
    text = conditions.get(collab.modality_of_kind("text") or "", None)
    out = Path(args.save_folder) / safe_dirname(mask_stem) / safe_dirname(text if text else "no_text")
    with atomic_write_dir(out, "--save_folder") as tmp:
        mask_rgb = None
        if ids is not None:
            mask_rgb = mask_to_rgb(ids, collab.mask_format)
            mask_rgb.save(tmp / f"{mask_stem}.png")
        if args.save_mixed and mask_rgb is None:
            raise UserError("--save_mixed blends the sample with the mask: pass --mask_path")
        save_generation(gen, tmp, decode=pipe.decode, mask_rgb=mask_rgb, save_z=args.save_z,
                        return_influence_function=args.return_influence_function,
                        display_x_inter=args.display_x_inter, save_mixed=args.save_mixed,
                        map_upscale=args.map_upscale)
        settings = {**vars(args), "ddim_steps": steps, "eta": eta, "guidance_scale": scale,
                    "modalities": list(collab.modalities), "timesteps": gen.timesteps}
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    print(f"wrote {args.batch_size} samples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
