"""The errors a user can fix, shared by every layer: each entry point prints one line and exits non-zero.

`run_cli` (config.parser) catches `UserFacingError` and prints `<label>: <message>` without a traceback
(`--debug` shows it) and exits with the error's `exit_code`; anything else is a bug and keeps its traceback.
Exit codes (docs/reliability.md): 1 bad settings or input, 3 non-finite training, 4 output_dir in use,
74 an I/O failure such as a full disk, 75 stopped by a signal after saving a checkpoint (resume it).
"""

from __future__ import annotations

EXIT_INPUT = 1
EXIT_NONFINITE = 3
EXIT_LOCKED = 4
EXIT_IO = 74  # EX_IOERR
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again (resume)


class UserFacingError(Exception):
    """An error whose message tells the user what to change; never a bug."""

    label = "error"
    exit_code = EXIT_INPUT


class InputError(UserFacingError, ValueError):
    """A data or input file that cannot be used; the message names file:line where known."""

    label = "data error"
