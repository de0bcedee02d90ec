"""Assemble a Shifted Diffusion checkpoint folder (what ``scripts/sample.py --method shifted`` loads).

    python scripts/shifted/make_checkpoint.py --prior outputs/shifted/prior_shifted \\
        --prior_baseline outputs/shifted/prior_baseline --decoder outputs/shifted/decoder \\
        --out ckpt/tiny/shifted

Copies the prior (with its bank), the optional unshifted baseline prior and the decoder into ``--out`` and writes
``shifted.json`` naming the CLIP and text-state folders by relative path (they are referenced, not copied). Every
piece is loaded and checked against the others first (one CLIP space, the prior's text encoder); the folder is
replaced all at once, keeping an existing README.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common.errors import UserError, cli_entry  # noqa: E402


@cli_entry
def main(argv=None) -> int:
    from common.io import atomic_write_dir
    from shifted.checkpoint import ShiftedCheckpoint, decoder_entries
    from shifted.cli import add_clip_args, clip_paths, text_states_path
    from shifted.pipeline import prior_entries
    from shifted.system import load_system

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", required=True, help="shifted prior folder (train.py's --output_dir)")
    p.add_argument("--prior_baseline", default=None, help="unshifted prior folder (train.py --no_bank)")
    p.add_argument("--decoder", required=True, help="decoder folder (finetune.py's --output_dir)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    add_clip_args(p)
    args = p.parse_args(argv)
    clips, states = clip_paths(args), text_states_path(args)
    system = load_system(None, prior=args.prior, decoder=args.decoder, clip=clips, text_states=states)
    if system.bank is None:
        raise UserError(f"--prior {args.prior} is a no-bank prior: pass the shifted one (its baseline goes to "
                        "--prior_baseline)")
    if args.prior_baseline:
        base = load_system(None, prior=args.prior_baseline, clip=clips, text_states=states, need_decoder=False)
        if base.bank is not None:
            raise UserError(f"--prior_baseline {args.prior_baseline} has a Gaussian bank: pass the --no_bank prior")
    out = Path(args.out)
    readme = (out / "README.md").read_text() if (out / "README.md").is_file() else None
    with atomic_write_dir(out, "--out") as tmp:
        for source, name in ((args.prior, "prior"), (args.prior_baseline, "prior_baseline")):
            if source:  # the model files only, not the training run's checkpoints and logs
                (tmp / name).mkdir()
                for entry in prior_entries(source):
                    shutil.copy2(Path(source) / entry, tmp / name / entry)
        (tmp / "decoder").mkdir()
        for name in decoder_entries(args.decoder):  # the model only, not the fine-tune's checkpoints and logs
            source = Path(args.decoder) / name
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, tmp / "decoder" / name)
        if readme is not None:
            (tmp / "README.md").write_text(readme)
        ShiftedCheckpoint.write_meta(tmp, clips, states, relative_to=out)
    print(f"wrote {out}: prior{' + prior_baseline' if args.prior_baseline else ''} + decoder; CLIP {[str(c) for c in clips]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
