"""The errors a user can cause or a run can meet, and how the command lines report them: on one line, naming the
file, field, key or argument, what was expected and what was given, without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class InputError(ValueError):
    """Bad input from the user (a file, a field, a key, an argument); the message names it, what was expected and
    what was given. The CLIs print it on one line, without a traceback."""


class RunStopped(RuntimeError):
    """A run that had to stop, for a reason stated in one line (a non-finite loss, a rank that stopped answering);
    the CLIs print it like an InputError."""


class Preempted(RunStopped):
    """A run stopped early by a scheduler's signal, after a checkpoint: resumable, but not finished. The CLIs exit
    with 128 + the signal's number, the status the shell gives a process ended by that signal, so a wrapper (a
    script's `train && eval`, a sweep marking runs done) never mistakes it for a finished run."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum


def one_line(err: BaseException) -> str:
    """The message of an error on one line; for one re-raised from a DataLoader worker (whose message is the
    worker's traceback), the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def run_reporting(prog: str, work: Callable[[], Any]) -> int:
    """A CLI's work: exit status 0 when done; an InputError or RunStopped is printed as `prog: error: message` on
    one line (no traceback) and gives 1 (a Preempted run: 128 + its signal's number)."""
    try:
        work()
    except (InputError, RunStopped) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return err.exit_status if isinstance(err, Preempted) else 1
    return 0


class ConfigError(InputError):
    """A config value, key or file that cannot be used; the message names where it came from."""


__all__ = ["InputError", "ConfigError", "RunStopped", "Preempted", "one_line", "run_reporting"]
