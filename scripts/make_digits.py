"""Build the embedded "digits" dataset from scikit-learn's bundled handwritten digits.

    python scripts/make_digits.py --output_dir data/digits

Writes ``train/`` (1,500) and ``test/`` (297) folders, each with ``images/*.png`` (32x32 RGB), ``masks/*.png``
(palette PNGs: 0 background, 1 stroke) and ``metadata.jsonl`` (file_name, text, mask_file_name, digit, color).
Rebuilding with the same version and seed is a no-op; the folder appears only when complete.
"""

import argparse

from common.digits import build_digits  # noqa: E402
from common.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="data/digits")
    parser.add_argument("--seed", type=int, default=0, help="colour/caption assignment and split seed")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = parser.parse_args(argv)
    out = build_digits(args.output_dir, seed=args.seed, force=args.force)
    print(f"digits dataset ready in {out} (train/ and test/ with images, masks, metadata.jsonl)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
