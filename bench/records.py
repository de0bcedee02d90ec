"""The benchmark record writer under its short name, for benchmarks run as ``python bench/<name>.py``.

The code lives in :mod:`common.bench_records` so that evaluation scripts outside ``bench/`` can write records too.
"""

from common.bench_records import DEFAULT_SECTION, RESULTS_JSON, load_records, render_markdown, write_records


__all__ = ["DEFAULT_SECTION", "RESULTS_JSON", "load_records", "render_markdown", "write_records"]
