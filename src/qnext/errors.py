"""One error type for problems the user can fix, and one wrapper that turns it into a clean exit.

Every entry point wraps its ``main`` with :func:`cli_main`; a :class:`UserError` then prints one
``error: ...`` message (what is wrong, where, and how to fix it) and exits non-zero, never a
bare traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Mapping, Optional, TypeVar

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


def start_stack_dumps(env: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """Honour ``QNEXT_STACK_DUMP_S``: dump all threads' stacks to stderr every that many seconds."""
    raw = (os.environ if env is None else env).get("QNEXT_STACK_DUMP_S", "").strip()
    if not raw or raw == "0":
        return None
    try:
        every = float(raw)
        if every <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"QNEXT_STACK_DUMP_S={raw!r} is not a positive number of seconds",
                        hint="unset it, or set e.g. QNEXT_STACK_DUMP_S=60") from None
    import faulthandler

    faulthandler.dump_traceback_later(every, repeat=True, file=sys.stderr)
    print(f"[qnext] QNEXT_STACK_DUMP_S: printing all Python stacks to stderr every {every:g}s", file=sys.stderr,
          flush=True)
    return every


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM (a killed job) into KeyboardInterrupt, so the writers' cleanup removes partial output."""
    import signal

    signal.signal(signal.SIGTERM, _raise_interrupt)


def cli_main(fn: F) -> F:
    """Run ``fn``; a UserError becomes one message on stderr and exit code 2.

    Set QNEXT_TRACEBACK=1 to see the full traceback of a UserError as well, and QNEXT_STACK_DUMP_S=N to
    have every thread's Python stack printed to stderr every N seconds (where a hang or a slow step is).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            start_stack_dumps()
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
