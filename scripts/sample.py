"""Generate images with any registered method of the lab: one entry point, the same flags, the same outputs.

    python scripts/sample.py --prompt "a red handwritten seven" --num_images 8            # shipped tiny baseline
    python scripts/sample.py --method baseline --checkpoint PATH/TO/SD --resolution 512 \\
        --prompt "a photo of a cat" --num_inference_steps 50 --guidance_scale 7.5 --sampler ddim --seed 0
    python scripts/sample.py --method codiff --help                                       # a method's own flags

Writes ``<output_dir>/images/NNNN.png``, ``grid.png``, ``metadata.jsonl`` (file_name, text: the judge's input) and
``settings.json``; the folder appears only when everything is written. The methods and their flags come from the
registry (``common.methods``): each method's settings dataclass is its flags, with its own defaults. Old flag
spellings (``--pretrained_model_name_or_path``, ``--steps``, ``--scale``) still work and print a warning.
"""

from common.sample_command import (  # noqa: F401  (the command's parts, for the tests and the web page)
    OLD_CHECKPOINT_FLAGS,
    build_parser,
    main,
    parse_args,
    read_prompts,
    settings_of,
    write_outputs,
)


if __name__ == "__main__":
    raise SystemExit(main())
