"""Errors the command line reports as one line (no traceback), and the exit codes it uses.

A :class:`UserError` is a problem with the user's input (a file, a flag, a config value, a model
path, a task name): the message names it and says what was expected. Set
``LIT_UNLEARN_DEBUG=1`` to see the traceback as well.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from difflib import get_close_matches
from typing import NoReturn, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(ValueError):
    """Bad user input; the message is a complete one-line explanation."""


class ModelPathError(UserError, FileNotFoundError):
    """A local-looking model or tokenizer path that does not exist."""


class TrainingDiverged(RuntimeError):
    """Training stopped because the model collapsed (NaN/inf steps, or the retain loss blew up)."""


class SaveFailed(RuntimeError):
    """The final model save failed; the message says where ``last.ckpt`` is."""


class RunInterrupted(SystemExit):
    """The run stopped on SIGTERM/SIGINT (exit 143/130): at an optimizer-step boundary after
    saving ``last.ckpt``, or at once (a second Ctrl-C, a signal during the final export), in
    which case ``message`` says which checkpoint to resume from."""

    def __init__(
        self, signal_name: str, step: int, checkpoint: str | None, message: str | None = None
    ) -> None:
        super().__init__(EXIT_SIGTERM if signal_name == "SIGTERM" else EXIT_SIGINT)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        resume = (
            f"resume with the same command plus --ckpt_path {checkpoint}"
            if checkpoint
            else "no checkpoint was written yet"
        )
        self.message = message or (
            f"stopped by {signal_name} after step {step}; state saved to {checkpoint}; {resume}"
        )


def suggest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match among ``choices``, else an empty string."""
    close = get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def debug() -> bool:
    """Whether ``LIT_UNLEARN_DEBUG`` asks for full tracebacks."""
    return os.environ.get("LIT_UNLEARN_DEBUG", "") not in ("", "0", "false")


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (from the launcher's environment; true when alone)."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        if os.environ.get(key, "0") != "0":
            return False
    return True


def fail(program: str, message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print ``program: error: message`` on one line to stderr (once, from rank 0) and exit."""
    if is_rank_zero():
        print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


def run_reporting_errors(program: str, fn: Callable[[], T], hint: Callable[[], str] | None = None) -> T:
    """Run ``fn``; report :class:`UserError`, :class:`TrainingDiverged` and :class:`SaveFailed` as one line (plus
    ``hint()``, e.g. where the last checkpoint is) and exit non-zero instead of a traceback."""
    try:
        return fn()
    except (UserError, TrainingDiverged, SaveFailed) as err:
        if debug():
            raise
        extra = hint() if hint is not None and not isinstance(err, SaveFailed) else ""
        code = (
            EXIT_DIVERGED
            if isinstance(err, TrainingDiverged)
            else 1
            if isinstance(err, SaveFailed)
            else EXIT_USER_ERROR
        )
        fail(program, f"{err}{extra}", code)


def function_cli(program: str, function: Callable[..., T], args: list[str] | None = None) -> T:
    """A jsonargparse command line over ``function`` whose errors (bad flags included) are one line."""
    from jsonargparse import CLI, ArgumentError

    def run() -> T:
        try:
            return CLI(function, args=args, as_positional=False, exit_on_error=False)
        except ArgumentError as err:
            raise UserError(" ".join(str(err).split())) from err

    return run_reporting_errors(program, run)
