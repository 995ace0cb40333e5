"""The one base class of the errors a user can fix: bad input, a busy or changed run, missing weights.

Library code raises them (never `SystemExit`); a command-line entry point prints their message as one
`error:` line and exits 1, where any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class WsssError(Exception):
    """A failure the user can fix; its message says what is wrong and what to do."""
