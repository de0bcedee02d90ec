"""Run any flow of a Versatile Diffusion folder: text-to-image, image variation, image-to-text, text variation, dual.

    python scripts/versatile/sample.py --flow t2i --prompt "a red handwritten seven" --num_samples 4
    python scripts/versatile/sample.py --flow i2i --image data/digits/test/images/00000.png --num_samples 4
    python scripts/versatile/sample.py --flow i2t --image data/digits/test/images/00000.png
    python scripts/versatile/sample.py --flow t2t --prompt "a blue handwritten two" --num_samples 4
    python scripts/versatile/sample.py --flow dual --prompt "a green digit" --image IMG.png --mix_ratio 0.5

Flows (paper Fig. 2): ``t2i`` / ``i2i`` (= ``iv``) / ``dual`` write ``images/NNNN.png``, ``grid.png`` and
``metadata.jsonl`` (file_name, text, flow, source); ``i2t`` / ``t2t`` (= ``tv``) write ``metadata.jsonl`` with one
generated caption per line (``text``) next to its source. ``--mix_ratio`` is the text weight of dual guidance
(0 = image only, 1 = text only), mixed inside every context layer. DDIM (``--steps``, eta 0) with classifier-free
guidance ``--scale``; defaults from the folder (VD: 50 steps, 7.5). Inputs are checked before anything is loaded:
bad input is one line on stderr, exit 2, and nothing written. The output folder appears only when complete.
"""

from versatile.flows_cli import main


if __name__ == "__main__":
    raise SystemExit(main())
