"""User-facing errors: one line that names the problem and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar


F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """Bad input from the user (flags, paths, files). Scripts print its message on one line and exit 2."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def cli_entry(main: F) -> F:
    """Decorate a script's ``main`` so a :class:`UserError` becomes ``error: <one line>`` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {one_line(str(err))}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
