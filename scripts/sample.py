"""Generate images with any registered method of the lab (the command is ``common.sample_command``; ``--help``).

    python scripts/sample.py --prompt "a red handwritten seven" --num_images 8
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
