"""Build the compositional embedded world "digits-pairs": two real handwritten digits side by side, two colours.

    python scripts/make_digits_pairs.py --output_dir data/digits_pairs

Writes ``train/`` (6,000 pairs of train-split digits) and ``test/`` (600 pairs of held-out digits), each with
``images/*.png`` (32x32 RGB: left digit | right digit, each 16 px wide), ``masks/*.png`` (palette PNGs: 0 background,
1 left stroke, 2 right stroke) and ``metadata.jsonl`` (file_name, text, mask_file_name, left_digit, left_color,
right_digit, right_color). Captions name both digits, both colours and the order ("a red three to the left of a
blue seven"). Rebuilding with the same settings is a no-op; the folder appears only when complete.
"""

import argparse

from common.digits_pairs import TEST_PAIRS, TRAIN_PAIRS, build_digits_pairs
from common.errors import cli_entry


@cli_entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="data/digits_pairs")
    parser.add_argument("--seed", type=int, default=0, help="pairing, colour/caption assignment and split seed")
    parser.add_argument("--train_pairs", type=int, default=TRAIN_PAIRS)
    parser.add_argument("--test_pairs", type=int, default=TEST_PAIRS)
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = parser.parse_args(argv)
    out = build_digits_pairs(args.output_dir, seed=args.seed, train_pairs=args.train_pairs,
                             test_pairs=args.test_pairs, force=args.force)
    print(f"digits-pairs dataset ready in {out} (train/ and test/ with images, masks, metadata.jsonl)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
