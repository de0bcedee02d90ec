"""Sample ContextDiff: ``scripts/sample.py --method contextdiff`` plus ``--config`` (a flat YAML of its flags).

    python scripts/contextdiff/sample.py --config configs/contextdiff/sample_tiny.yaml --prompt "a red handwritten seven"
    python scripts/contextdiff/sample.py --pretrained_model_name_or_path outputs/contextdiff/stage2 \\
        --prompt "a blue handwritten one" --num_images 8 --guidance_scale 3 --no_shift

Every flag of ``scripts/sample.py`` and the method's own (``--adapter_path --no_shift --k_schedule --k_scale
--t5_model_name_or_path --t5_max_length``) works; YAML keys must be such flags (command-line flags win). An adapter
that reads T5 states gets its T5 from the checkpoint's ``t5/`` (or the stage-1 adapter's record) unless
``--t5_model_name_or_path`` overrides it. Outputs as ``scripts/sample.py``: ``images/``, ``grid.png``,
``metadata.jsonl``, ``settings.json``.
"""

import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

from common.errors import UserError, cli_entry  # noqa: E402


def config_argv(path, parser) -> list:
    """A flat YAML of flag defaults -> command-line tokens (placed before the user's, so the user's win)."""
    from common.train import load_yaml_defaults

    argv = []
    for key, value in load_yaml_defaults(path, parser).items():
        if key == "method":
            raise UserError(f"--config {path}: 'method' is fixed to contextdiff by this script")
        if isinstance(value, bool):
            if value:
                argv.append(f"--{key}")
            elif parser.get_default(key):
                raise UserError(f"--config {path}: {key}: false cannot switch off a default-on flag")
        elif isinstance(value, list):
            for item in value:
                argv += [f"--{key}", str(item)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


@cli_entry
def main(argv=None) -> int:
    import argparse

    from common import sample_command as sample
    from contextdiff import sample_cli
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    prefix = []
    if known.config:
        parser = sample.build_parser()
        sample_cli.add_arguments(parser.add_argument_group("contextdiff options"))
        prefix = config_argv(known.config, parser)
    return sample.main(["--method", "contextdiff", *prefix, *rest])


if __name__ == "__main__":
    raise SystemExit(main())
