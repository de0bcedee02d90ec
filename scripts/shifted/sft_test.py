"""Text -> shifted-diffusion prior -> CLIP image embedding -> image (the reference ``sft_test.py``).

    python scripts/shifted/sft_test.py --prompt "a red handwritten seven" --output_dir outputs/shifted/t2i
    python scripts/shifted/sft_test.py --prior out/prior --decoder out/finetune --prompt_file p.txt

The prior (default: the shipped ``ckpt/tiny/shifted``; ``--prior_variant baseline`` for the unshifted prior) samples
an image embedding for each caption with 8 respaced DDPM steps (the prior sampling flags of ``shifted.cli``), and the
language-free decoder renders it with classifier-free guidance against the null embedding it was trained with (or
against the prior's embedding of ``--negative_prompt``). Writes ``images/``, ``metadata.jsonl`` (file_name, text:
what ``scripts/evaluate.py judge`` reads), ``grid.png`` and ``embeddings.safetensors``, all at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError, cli_entry  # noqa: E402


def read_prompts(args) -> list[str]:
    from shifted.embeddings import check_texts

    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt_file {path} does not exist: pass a text file with one prompt per line")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT (repeatable) or --prompt_file FILE")
    prompts = check_texts(prompts)
    n = args.num_images or len(prompts)
    if n < 1:
        raise UserError(f"--num_images must be >= 1, got {n}")
    return [prompts[i % len(prompts)] for i in range(n)]


@cli_entry
def main(argv=None) -> int:
    from common.io import save_safetensors, write_image_folder
    from shifted.cli import (
        DEFAULT_CHECKPOINT,
        add_clip_args,
        add_decoder_args,
        add_prior_sampling_args,
        decoder_kwargs,
        prior_sampling_kwargs,
    )
    from shifted.system import load_system, text_to_image

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", default=None, help="a caption; repeat for several")
    p.add_argument("--prompt_file", default=None, help="a text file with one caption per line")
    p.add_argument("--num_images", type=int, default=None, help="images in total (captions cycled)")
    p.add_argument("--negative_prompt", default="", help="decoder negative = prior(this) instead of the null")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                   help="Shifted Diffusion checkpoint folder; --prior/--decoder/--clip/--t5_model override parts")
    p.add_argument("--prior", default=None, help="prior folder written by train.py (its --output_dir)")
    p.add_argument("--prior_variant", default="shifted", choices=("shifted", "baseline"),
                   help="which prior of --checkpoint: shifted, or the unshifted baseline of the same size")
    p.add_argument("--decoder", default=None, help="decoder pipeline folder written by finetune.py")
    p.add_argument("--output_dir", default="outputs/shifted/sft_test")
    add_clip_args(p)
    add_prior_sampling_args(p, prefix="prior_")
    add_decoder_args(p)
    from common import limits

    args = limits.check_namespace(p.parse_args(argv))
    prompts = read_prompts(args)
    kwargs = decoder_kwargs(args)
    prior_kwargs = prior_sampling_kwargs(args, prefix="prior_")
    explicit = args.prior and args.decoder and args.clip
    system = load_system(None if explicit else args.checkpoint, prior=args.prior, decoder=args.decoder,
                         clip=args.clip, text_states=args.t5_model, prior_variant=args.prior_variant,
                         device=args.device)
    images, emb = text_to_image(system, prompts, seed=args.seed, prior_kwargs=prior_kwargs, decoder_kwargs=kwargs,
                                negative_prompt=args.negative_prompt)
    folder = write_image_folder(args.output_dir, images, [{"text": t} for t in prompts], {
        "embeddings.safetensors": lambda f: save_safetensors({"image_emb": emb}, f)})
    print(f"wrote {len(prompts)} image(s) to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
