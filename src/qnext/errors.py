"""One error type for problems the user can fix, and one wrapper that turns it into a clean exit.

Every entry point wraps its ``main`` with :func:`cli_main`; a :class:`UserError` then prints one
``error: ...`` message (what is wrong, where, and how to fix it) and exits non-zero, never a
bare traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input (file, config key, option). The message names the fix."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


def format_user_error(err: UserError) -> str:
    text = f"error: {err.message}"
    if err.hint:
        text += f"\n  fix: {err.hint}"
    return text


def cli_main(fn: F) -> F:
    """Run ``fn``; a UserError becomes one message on stderr and exit code 2.

    Set QNEXT_TRACEBACK=1 to see the full traceback of a UserError as well.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            rc = fn(*args, **kwargs)
        except UserError as err:
            if os.environ.get("QNEXT_TRACEBACK"):
                raise
            print(format_user_error(err), file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        return rc

    return wrapper  # type: ignore[return-value]
