"""The one base class of the errors a user can fix: bad input, a busy or changed run, missing weights.

Library code raises them (never `SystemExit`); a command-line entry point prints their message as one
`error:` line and exits 1, where any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class WsssError(Exception):
    """A failure the user can fix; its message says what is wrong and what to do."""


class StageError(WsssError, RuntimeError):
    """A stage cannot (or must not) go on; the message says why and what to do."""


class DeviceError(WsssError, RuntimeError):
    """The device or precision asked for is not there (--device cuda without a working CUDA, a GPU
    index past the visible ones, --amp bf16 on a GPU without bfloat16); the message names the flag."""


class DatasetError(WsssError, ValueError):
    """Bad input in a dataset; the message names the file and the problem.

    `message` is that one line wherever the error was raised. A DataLoader worker's error reaches the
    main process rebuilt by torch from text (`DatasetError("Caught DatasetError in DataLoader worker
    process 0. Original Traceback ...: MESSAGE")`), so the constructor takes the message back out
    of such a text: one place knows that format, and callers read a field. Pickles (a process pool's
    worker sends it whole) as any exception built from its text does."""

    WORKER_TEXT = "DatasetError: "  # how a traceback's last line names this error before its message

    def __init__(self, text: str = "", *args):
        super().__init__(text, *args)
        lines = str(text).strip().splitlines() or [""]
        self.message = lines[-1].split(self.WORKER_TEXT)[-1]
