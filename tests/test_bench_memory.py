"""bench/bench_memory.py's process runner: it reads the child's report and its resident peak, and stops a child
that passes the memory cap or the time limit (the benchmark itself is not run here: minutes per request)."""

import argparse
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_memory import budget_label, budget_value, run_capped  # noqa: E402


pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")

MB = 2**20
# holds ~N MB of touched pages (bytearray zero-fills them) for a moment, then reports as the worker does
HOLD = "import json, time; block = bytearray({n} * 2**20); time.sleep({sleep}); print(json.dumps({{'held': len(block)}}))"


def test_reports_the_child_and_its_resident_peak():
    result = run_capped([sys.executable, "-c", HOLD.format(n=200, sleep=0.5)], cap_bytes=2**40, timeout_s=60)
    assert result.returncode == 0 and not result.killed, result
    assert result.report == {"held": 200 * MB}
    assert 200 * MB <= result.polled_peak_bytes < 1024 * MB, result.polled_peak_bytes


def test_stops_a_child_above_the_memory_cap():
    result = run_capped([sys.executable, "-c", HOLD.format(n=400, sleep=30)], cap_bytes=150 * MB, timeout_s=60)
    assert result.killed.startswith("memory above"), result
    assert result.returncode != 0 and result.report == {}
    assert result.polled_peak_bytes > 150 * MB


def test_stops_a_child_past_the_time_limit():
    result = run_capped([sys.executable, "-c", HOLD.format(n=1, sleep=30)], cap_bytes=2**40, timeout_s=1)
    assert result.killed.startswith("time above"), result
    assert result.returncode != 0


def test_budgets_parse_and_label():
    assert budget_value("default") is None and budget_value("0.5") == 0.5
    for bad in ("0", "-1", "nan", "inf", "four"):
        with pytest.raises(argparse.ArgumentTypeError):
            budget_value(bad)
    assert budget_label(None).startswith("default budget") and budget_label(4.0) == "--max_memory_gb 4"
