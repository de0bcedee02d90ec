"""Text-guided video editing with ContextDiff: one-shot tuning, contextualized inversion, edited sampling.

    python scripts/contextdiff/edit_video.py --video embedded --target_prompt "a blue handwritten seven" \\
        --output_dir outputs/contextdiff_video

Flags, inputs and outputs: ``contextdiff.video_cli`` (``--help``).
"""

from contextdiff.video_cli import main


if __name__ == "__main__":
    raise SystemExit(main())
