"""Atomic file output: a stage either writes its whole output or nothing at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trifle.errors import DataError

#: What ``np.load`` raises on a damaged ``.npz`` (a truncated copy, an interrupted write elsewhere): the
#: loaders turn these into one DataError naming the file. A truncated zip is ``BadZipFile``, which is not
#: an OSError, and a member cut short raises EOFError.
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file keeps the target's suffix, so libraries that infer the format from the
    extension (h5py, torch, pyjuice) behave the same as for the final name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`write_json`; a file that is not JSON (a text file or a
    checkpoint given in its place) is a DataError naming it, not a decoder traceback."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable JSON file ({err})") from err


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB files do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
