"""The project's error types for bad input: the CLI prints them as one line (what, where, how to fix) and exits 2.

Domain errors subclass `UserError` and the builtin they refine (`ConfigError(UserError, ValueError)`), so code
that catches the builtin keeps working. Anything that is not a `UserError` (or one of `PLAIN_USER_ERRORS`) is a
bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a bad state of the user's files: the message says what is wrong, where, and how to fix it."""

    def __str__(self) -> str:
        # KeyError subclasses would otherwise print their message quoted.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UnknownNameError(UserError, KeyError):
    """A name that no registry knows (preset, loss, protocol, index kind, dataset); the message lists the known."""


class OutputBusyError(UserError):
    """Another process is writing the same output (its lock file is held)."""


class IntegrityError(UserError, ValueError):
    """A file's bytes do not match the checksum recorded when it was written (corrupt or changed since)."""


class DataFormatError(UserError, ValueError):
    """An input file (collection, topics, qrels, parquet, retrieval results, model or tokenizer file, the local
    registry) does not have the expected format; the message names the file and, where it can, the line."""


class SettingError(UserError, ValueError):
    """An option, argument or parameter value that is out of range or does not fit the input (`-k 0`, more shards
    than documents, a dataset name with a slash); the message names the setting and what is allowed."""


# OS errors that are about the user's paths, not bugs: printed without a traceback too.
PLAIN_USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
