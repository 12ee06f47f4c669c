"""Exception hierarchy of bluesky-ptychopinn.

Callers can catch precisely (``except FileFormatError``) or broadly
(``except PtychoError``). Every exception derives from a built-in one as well,
so code written against ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "PtychoError",
    "InvalidInputError",
    "FileFormatError",
    "CheckpointError",
    "OutputExistsError",
]


class PtychoError(Exception):
    """Base class of every error raised on purpose by this package."""


class InvalidInputError(PtychoError, ValueError):
    """An argument has the wrong shape, dtype, range or contains non-finite values."""


class FileFormatError(InvalidInputError):
    """A file is missing a field or holds a field of the wrong shape, dtype or values.

    Parameters
    ----------
    path : str
        The file.
    field : str
        The dataset or key inside the file ("" for the file as a whole).
    problem : str
        What was expected and what was found.
    """

    def __init__(self, path: object, field: str, problem: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path}: field {field!r}" if field else self.path
        super().__init__(f"{where}: {problem}")


class CheckpointError(PtychoError, ValueError):
    """A model checkpoint is corrupt, has a wrong hash or does not match its config."""


class OutputExistsError(PtychoError, FileExistsError):
    """An output file exists and replacing it was not asked for."""
