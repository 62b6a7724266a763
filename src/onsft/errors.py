"""User-facing errors: one line naming the file, the line and the fix, exit code 2.

Anything a user can cause (a bad file, a missing column, an unknown model) raises `UserError`.
The CLI prints `str(error)` alone (no traceback) and exits with `EXIT_USER_ERROR`.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_USER_ERROR = 2


@dataclass
class UserError(Exception):
    """An error the user can fix. `where` is a file path (or a name like 'config'), `line` is 1-based."""

    message: str
    where: str | None = None
    line: int | None = None
    fix: str | None = None

    def __str__(self) -> str:
        location = ""
        if self.where is not None:
            location = f"{self.where}:{self.line}: " if self.line is not None else f"{self.where}: "
        text = f"onsft: error: {location}{self.message}"
        if self.fix:
            text += f" Fix: {self.fix}"
        # One line, always: multi-line messages from libraries are folded.
        return " ".join(text.split())


def warn(message: str, where: str | None = None, line: int | None = None) -> None:
    """A problem worth a user's attention that does not stop the run: one line on stderr, `onsft: warning:`."""
    import sys

    location = "" if where is None else (f"{where}:{line}: " if line is not None else f"{where}: ")
    print(" ".join(f"onsft: warning: {location}{message}".split()), file=sys.stderr, flush=True)
