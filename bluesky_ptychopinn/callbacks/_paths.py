"""Where the live reconstruction may read detector files: the configured data roots only.

A raw run's StreamResource/Resource documents name the files to read. Opened blindly, a URI
with ``..``, any absolute path, or ``file://other-host/...`` would let whoever writes documents
make the reconstruction read (and publish into Tiled) any file the process can read.
:class:`DataRoots` resolves a URI to a local path and refuses everything outside its roots;
the refusal is recorded in the derived run, never silently skipped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["DATA_ROOTS_ENV", "DataRoots", "PathRefused"]

#: Extra data roots, separated by ``os.pathsep`` (e.g. a beamline's detector directory).
DATA_ROOTS_ENV = "BLUESKY_PTYCHOPINN_DATA_ROOTS"


class PathRefused(ValueError):
    """A detector file outside the data roots, on another host, or not a regular file."""


class DataRoots:
    """The directories detector files may be read from.

    Parameters
    ----------
    roots : iterable of path-like, optional
        The data roots. Default: the current directory, the system's temporary directory
        (where simulated detectors and tests write) and every directory in the environment
        variable ``BLUESKY_PTYCHOPINN_DATA_ROOTS``.
    extra : iterable of path-like, optional
        Roots added to the default ones (``--data-root``).
    """

    def __init__(self, roots: Iterable | None = None, extra: Iterable = ()) -> None:
        if roots is None:
            roots = [Path.cwd(), Path(tempfile.gettempdir())]
            roots += [p for p in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p]
        self.roots = tuple(Path(r).expanduser().resolve() for r in [*roots, *extra])

    def __repr__(self) -> str:
        return f"DataRoots({[str(r) for r in self.roots]})"

    def resolve(self, uri: str, root: str = "") -> Path:
        """The local path of ``uri`` (``file://localhost/...``, ``file:///...`` or a plain
        absolute path, optionally under a legacy Resource's ``root``).

        Raises
        ------
        PathRefused
            Another host, a relative path, or a path outside every data root (after
            resolving ``..`` and symbolic links).
        """
        parsed = urlparse(uri)
        if parsed.scheme not in ("file", ""):
            raise PathRefused(f"{uri!r}: only file URIs are read (scheme {parsed.scheme!r})")
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise PathRefused(f"{uri!r}: a file on another host ({parsed.netloc!r}) is not read")
        raw = unquote(parsed.path) if parsed.scheme else uri
        path = Path(root) / raw if root else Path(raw)
        if not path.is_absolute():
            raise PathRefused(f"{uri!r}: a relative detector path is ambiguous; not read")
        resolved = path.resolve()
        if not any(resolved == r or r in resolved.parents for r in self.roots):
            raise PathRefused(
                f"{str(path)!r} is outside the data roots {[str(r) for r in self.roots]} "
                f"(add its directory with data_roots= / --data-root or {DATA_ROOTS_ENV})")
        return resolved
