"""Interleaved benchmarking of configurations that each need their own process.

A compiled network keeps its graphs in the process that compiled it, and a configuration's peak memory is only
its own if nothing else ran in that process; so each configuration lives in a worker process (``python
bench/<script>.py --worker JSON``) that sets up once (load, warm-up, compile) and then runs one repetition per
``run`` command. The parent sends ``run`` to the workers in turn, rotating the order every round, so load from
other processes on a shared machine hits every configuration alike; CPU time (``time.process_time`` of the worker)
is the steadier figure there. On ``quit`` a worker reports its peak RSS (``ru_maxrss``: load + compile + runs).

Protocol (one JSON object per line): worker -> ``{"ready": ..., setup figures}`` once, then one line per command.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


REPO = Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, script: str, name: str, config: dict[str, Any], threads: int = 1):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
        self.name, self.config = name, config
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / script), "--worker", json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
        )  # fmt: skip
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"benchmark worker {self.name} exited (code {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def quit(self) -> dict[str, Any]:
        out = self.ask("quit")
        self.proc.wait()
        return out


def serve(handlers: dict[str, Callable[[], dict[str, Any]]], ready: dict[str, Any]) -> None:
    """The worker side: report ``ready``, then answer commands until ``quit`` (which reports the peak RSS)."""
    reply(dict(ready, ready=True))
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            reply({"peak_rss_mb": peak_rss_mb()})
            return
        reply(handlers[command]())


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleave(workers: list[Worker], reps: int, command: str = "run") -> dict[str, list[dict[str, Any]]]:
    """``reps`` rounds of ``command`` to every worker, the order rotated each round."""
    results: dict[str, list[dict[str, Any]]] = {w.name: [] for w in workers}
    for rep in range(reps):
        order = workers[rep % len(workers):] + workers[:rep % len(workers)]
        for worker in order:
            results[worker.name].append(worker.ask(command))
    return results
