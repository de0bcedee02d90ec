"""Benchmark records: ``bench/results.json`` holds the data, ``bench/results.md`` is rendered from it.

Every benchmark calls :func:`write_records` with its figures; a record is replaced by name (so re-running a
benchmark updates its rows instead of appending duplicates) and the markdown is re-rendered grouped by section.
Fields: name, value, unit, target, command, date, commit, machine, section. ``date``, ``commit`` and ``machine``
are filled in when missing; ``commit`` is "uncommitted" when the working tree has changes, because then the short
hash would name code that is not what was measured.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "results.md"
COLUMNS = ("name", "value", "unit", "target", "command", "date", "commit", "machine")
DEFAULT_SECTION = "misc"


def git_commit() -> str:
    """Short HEAD hash, or "uncommitted" if there is no commit or the tree differs from it (results files aside)."""
    root = BENCH_DIR.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!bench/results.json", ":!bench/results.md"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return "uncommitted" if dirty.strip() or not head else head


def machine() -> str:
    """CPU model and core count (and the GPU, if the benchmark already imported torch and has one)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [f"{cpu}, {os.cpu_count()} cores", f"{platform.system()} {platform.release()}"]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    return "; ".join(parts)


def load_records(path: Path = RESULTS_JSON) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records")
    return data


def write_records(
    records: Iterable[Mapping[str, Any]], path: Path = RESULTS_JSON, replace_section: str | None = None
) -> list[dict[str, Any]]:
    """Upsert ``records`` by name into results.json (under a file lock, atomic replace) and re-render results.md.

    ``replace_section``: a benchmark that owns a section passes its name, and that section's rows not in
    ``records`` are dropped, so a renamed figure does not linger beside its new name.
    """
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    filled = []
    commit, host = None, None
    for record in records:
        if "name" not in record or "value" not in record:
            raise ValueError(f"a benchmark record needs at least name and value: {record!r}")
        if commit is None:
            commit, host = git_commit(), machine()
        full = {
            "unit": "",
            "target": "",
            "command": "",
            "date": now,
            "commit": commit,
            "machine": host,
            "section": DEFAULT_SECTION,
        }
        full.update(record)
        filled.append(full)
    # Two benchmarks finishing together must not drop each other's rows. The lock lives outside the repository
    # (results.json itself is replaced, so its inode cannot carry the lock).
    lock_name = "diffusion-lab-" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12] + ".lock"
    with open(Path(tempfile.gettempdir()) / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = load_records(path)
        if replace_section is not None:
            keep = {r["name"] for r in filled}
            existing = [r for r in existing if r.get("section") != replace_section or r["name"] in keep]
        by_name = {r["name"]: i for i, r in enumerate(existing)}
        for record in filled:
            if record["name"] in by_name:
                existing[by_name[record["name"]]] = record
            else:
                by_name[record["name"]] = len(existing)
                existing.append(record)
        _atomic_write(path, json.dumps(existing, indent=2) + "\n")
        _atomic_write(path.with_suffix(".md"), render_markdown(existing))
    return existing


def render_markdown(records: list[Mapping[str, Any]]) -> str:
    """One table per section, sections and rows in first-seen order."""
    sections: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        sections.setdefault(str(record.get("section") or DEFAULT_SECTION), []).append(record)
    lines = [
        "# Benchmark results",
        "",
        "Generated by `bench/records.py` from `bench/results.json`; each benchmark script updates its own rows.",
        "Ratios are measured side by side in one run (interleaved repetitions, medians).",
        "",
    ]
    for section, rows in sections.items():
        lines += [f"## {section}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for row in rows:
            cells = [_cell(row.get(col, ""), code=(col == "command")) for col in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(value: Any, code: bool = False) -> str:
    text = "" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if code and text else text


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
