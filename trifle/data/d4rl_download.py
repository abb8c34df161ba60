"""Fetch the D4RL v2 Gym-MuJoCo datasets: resumable, verified and never half-written.

The files are 60-475 MB and served over plain HTTP from one university server, so transfers do break.
A download therefore streams into ``<dest>.part``, resumes it with an HTTP ``Range`` request after a
dropped connection (or on the next run), checks the published size and sha256 and only then renames the
file onto ``dest``. Users who already hold a dataset (a D4RL cache in ``~/.d4rl/datasets``, a mirror, a
copy on a cluster) can point at it instead; it is verified the same way, so every run trains on the
published bytes.

Only the standard library and tqdm are used, so the download works in the smallest environment.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from trifle.errors import ConfigError, DataError
from trifle.io import sha256_of

D4RL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"

# Seconds before the first retry; doubled per failure up to _RETRY_DELAY_MAX_S (tests set it to 0).
_RETRY_DELAY_S = 1.0
_RETRY_DELAY_MAX_S = 30.0


@dataclass(frozen=True)
class D4RLFile:
    """One published D4RL dataset: its id, environment, URL basename and published checksum."""

    name: str
    env: str
    filename: str
    size: int
    sha256: str


def _entry(env: str, dataset: str, size: int, sha256: str) -> D4RLFile:
    """Derive the id and the URL basename the way D4RL names them (``hopper_medium_replay-v2.hdf5``)."""
    return D4RLFile(
        name=f"{env}-{dataset}-v2",
        env=env,
        filename=f"{env}_{dataset.replace('-', '_')}-v2.hdf5",
        size=size,
        sha256=sha256,
    )


# Sizes and sha256 as published in TensorFlow-Datasets' d4rl checksums.
_PUBLISHED = (
    _entry("hopper", "medium", 152756557, "5bdf1bc4a713c82941de44633df669b36c89850b652a25985166796d25cf71a0"),
    _entry(
        "hopper",
        "medium-replay",
        75854457,
        "e121c5f7c9857a307baa9edc6a2c3b48e85fedb9ac316ecddd0f48ca7ef4e39b",
    ),
    _entry(
        "hopper",
        "medium-expert",
        304537315,
        "9d51ad87f8c905be3880d84c6140bcdb7fbf39a19e046a237f238ba34fec9e26",
    ),
    _entry(
        "halfcheetah", "medium", 237727262, "41324e8487a9556d8cfa4538827f8937f4d63dae3030825ebc9f3a726ed08ca0"
    ),
    _entry(
        "halfcheetah",
        "medium-replay",
        59448533,
        "48d494a4770c11f48260736dec090b78bdca8375647ed4d24bfa5b6610c7f683",
    ),
    _entry(
        "halfcheetah",
        "medium-expert",
        474567252,
        "015db75dae5bbe8e94029b71fa0bafc2073365df0c94744e71031189f3f79c06",
    ),
    _entry(
        "walker2d", "medium", 232254996, "cf00f43add04c17fdfc2958dd581dea0851b2e5bedbe6fda073758a8f841aeda"
    ),
    _entry(
        "walker2d",
        "medium-replay",
        86323963,
        "e75de96a4f77acf7d4e0d6fdf0d7ccb177c26c44bb4388e4fd99f543ccfa18db",
    ),
    _entry(
        "walker2d",
        "medium-expert",
        462197079,
        "6b8d7f868c45bbaedf460be797fb7271b46dee6ebe45fe7a64319f2005b59a04",
    ),
)

D4RL_FILES: dict[str, D4RLFile] = {entry.name: entry for entry in _PUBLISHED}


def d4rl_file(name: str) -> D4RLFile:
    """Look up a dataset id; an unknown one is a config mistake, so list the ids that exist."""
    try:
        return D4RL_FILES[name]
    except KeyError:
        raise ConfigError(
            f"unknown D4RL dataset {name!r}; expected one of: {', '.join(sorted(D4RL_FILES))}"
        ) from None


def d4rl_url(name: str, base_url: str = D4RL_BASE_URL) -> str:
    """The download URL of dataset ``name`` under ``base_url`` (a mirror keeps D4RL's file names)."""
    return f"{base_url.rstrip('/')}/{d4rl_file(name).filename}"


def _mismatch(path: Path, size: int | None, sha256: str | None) -> str | None:
    """Describe how ``path`` differs from the expected size/sha256, or None if it matches.

    The size is checked first because it is free and catches truncated files without hashing them.
    """
    found_size = path.stat().st_size
    if size is not None and found_size != size:
        return f"has {found_size} bytes, expected {size} bytes"
    if sha256 is not None:
        found = sha256_of(path)
        if found != sha256.strip().lower():
            return f"has sha256 {found}, expected sha256 {sha256}"
    return None


def verify_file(path: str | os.PathLike[str], *, size: int | None, sha256: str | None, label: str) -> None:
    """Raise :class:`DataError` unless ``path`` exists and has the expected size and sha256."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file for dataset {label} not found")
    problem = _mismatch(p, size, sha256)
    if problem is not None:
        raise DataError(
            f"{p}: file for dataset {label} {problem} (corrupt, truncated or not the published file)"
        )


class _Retryable(Exception):
    """A failure that may go away on another try: a dropped connection, a timeout, a 5xx answer."""


def partial_path(dest: str | os.PathLike[str]) -> Path:
    """Where the download of ``dest`` accumulates; kept between runs so they can resume."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    size: int | None,
    sha256: str | None,
    label: str,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest`` through a resumable ``.part`` file, verify it, then rename it into place.

    Dropped or stalled transfers and 5xx answers are retried (resuming what arrived) ``retries`` times;
    4xx answers fail at once because asking again cannot help. ``dest`` only ever appears complete and
    verified; a partial file that fails verification is deleted so that the next run starts afresh.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    failures = 0
    while True:
        try:
            _attempt(
                url, part, size=size, label=label, progress=progress, timeout=timeout, chunk_size=chunk_size
            )
            break
        except _Retryable as err:
            failures += 1
            if failures > retries:
                raise DataError(f"{err} (gave up after {retries} retries)") from err
            time.sleep(min(_RETRY_DELAY_S * 2 ** (failures - 1), _RETRY_DELAY_MAX_S))
    _verify_download(url, part, dest, size=size, sha256=sha256, label=label)
    os.replace(part, dest)
    return dest


def _verify_download(
    url: str, part: Path, dest: Path, *, size: int | None, sha256: str | None, label: str
) -> None:
    """Delete a complete-looking but wrong download: resuming it could never make it right."""
    problem = _mismatch(part, size, sha256)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise DataError(
            f"dataset {label}: the download of {url} {problem}; deleted it ({part}) and left {dest} "
            "untouched; rerun to download again or check the URL/mirror"
        )


def _attempt(
    url: str, part: Path, *, size: int | None, label: str, progress: bool, timeout: float, chunk_size: int
) -> None:
    """One request: resume ``part`` from its current length and stream the rest of the file into it."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have == size:
        return  # an earlier run received everything; only verification is left
    if size is not None and have > size:
        part.unlink()  # longer than the published file: cannot be a prefix of it
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    total: int | None = None
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as response:
            total = _prepare(response, url, part, have=have, size=size, label=label)
            _stream(response, part, total=total, label=label, progress=progress, chunk_size=chunk_size)
    except urllib.error.HTTPError as err:
        err.close()
        _handle_status(err, url, part, have=have, label=label)
        return
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as err:
        expected = total if total is not None else size
        raise _Retryable(_incomplete(url, part, expected, label, reason=_reason(err))) from err
    received = part.stat().st_size if part.exists() else 0
    expected = total if total is not None else size
    if expected is not None and received < expected:
        raise _Retryable(_incomplete(url, part, expected, label, reason="the connection closed early"))


def _prepare(
    response: http.client.HTTPResponse, url: str, part: Path, *, have: int, size: int | None, label: str
) -> int | None:
    """Decide from the answer whether to append (206) or restart (200); return the full file size if known."""
    length = _int_or_none(response.headers.get("Content-Length"))
    if response.status == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start != have:
            part.unlink(missing_ok=True)
            raise _Retryable(f"dataset {label}: {url} resumed at byte {start} instead of {have}; restarting")
        if total is None and length is not None:
            total = have + length
    else:
        part.write_bytes(b"")  # the server ignored Range and sends the whole file: start over
        total = length
    if size is not None and total is not None and total != size:
        part.unlink(missing_ok=True)
        raise DataError(
            f"dataset {label}: {url} has {total} bytes, expected {size} bytes (not the published file; "
            "check the URL/mirror)"
        )
    return total


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    *,
    total: int | None,
    label: str,
    progress: bool,
    chunk_size: int,
) -> None:
    """Append the body to ``part`` chunk by chunk, so whatever arrived survives a dropped connection.

    ``read1`` returns what has arrived instead of waiting for a full chunk, so a timeout loses nothing.
    """
    start = part.stat().st_size
    bar = tqdm(
        total=total,
        initial=start,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=not progress,
    )
    with bar, open(part, "ab") as f:
        try:
            while chunk := response.read1(chunk_size):
                f.write(chunk)
                bar.update(len(chunk))
        finally:
            f.flush()
            os.fsync(f.fileno())


def _handle_status(err: urllib.error.HTTPError, url: str, part: Path, *, have: int, label: str) -> None:
    """Map an HTTP error status to the right outcome: complete (416 at the end), retry (5xx) or fail (4xx)."""
    message = f"dataset {label}: downloading {url} failed with HTTP {err.code} {err.reason}"
    if err.code == 416:
        _, total = _content_range(err.headers.get("Content-Range"))
        if total == have:
            return  # the partial file already holds the whole file
        part.unlink(missing_ok=True)
        raise _Retryable(f"{message} (the partial file did not match the server's file; restarting)")
    if err.code >= 500:
        raise _Retryable(message)
    hint = " (check the dataset name and base_url)" if err.code == 404 else ""
    raise DataError(message + hint) from err


def _incomplete(url: str, part: Path, total: int | None, label: str, *, reason: str) -> str:
    """The message for a transfer that stopped early; it says the partial file is kept for resuming."""
    received = part.stat().st_size if part.exists() else 0
    of = f"{total}" if total is not None else "an unknown number of"
    return (
        f"dataset {label}: transfer of {url} incomplete ({reason}): {received} of {of} bytes arrived; "
        f"the partial file {part} is kept and rerunning resumes it"
    )


def _reason(err: Exception) -> str:
    """A short description of a network error (URLError wraps the real one in ``reason``)."""
    inner = err.reason if isinstance(err, urllib.error.URLError) else err
    return f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` or ``bytes */TOTAL`` into (START, TOTAL); unknown parts are None."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    start, total = match.groups()
    return _int_or_none(start), _int_or_none(total)


def default_search_dirs() -> list[Path]:
    """Where D4RL itself caches its files: ``$D4RL_DATASET_DIR`` if set, and ``~/.d4rl/datasets``."""
    dirs = [Path(os.environ["D4RL_DATASET_DIR"])] if os.environ.get("D4RL_DATASET_DIR") else []
    return [*dirs, Path.home() / ".d4rl" / "datasets"]


def fetch_d4rl(
    name: str,
    dest: str | os.PathLike[str],
    *,
    base_url: str = D4RL_BASE_URL,
    file: str | os.PathLike[str] | None = None,
    size: int | None = None,
    sha256: str | None = None,
    search_dirs: Sequence[str | Path] | None = None,
    progress: bool = True,
) -> Path:
    """Put the verified dataset ``name`` at ``dest``: reuse ``dest``, else a given ``file``, else a cached
    copy in ``search_dirs``, else download it from ``base_url``.

    ``size``/``sha256`` override the published values (for mirrors and tests). A ``file`` or cached copy
    that fails verification is an error rather than silently replaced, so a user learns their copy is bad.
    """
    entry = d4rl_file(name)
    size = entry.size if size is None else size
    sha256 = entry.sha256 if sha256 is None else sha256
    dest = Path(dest)
    if dest.is_file() and _mismatch(dest, size, sha256) is None:
        return dest
    source = Path(file) if file is not None else _find_cached(entry, dest, search_dirs)
    if source is not None:
        if file is not None and not source.is_file():
            raise DataError(f"{source}: file given for dataset {name} not found (expected {entry.filename})")
        verify_file(source, size=size, sha256=sha256, label=name)
        return _place(source, dest)
    return download_file(
        d4rl_url(name, base_url), dest, size=size, sha256=sha256, label=name, progress=progress
    )


def fetch_file(
    path: str | os.PathLike[str], dest: str | os.PathLike[str], *, sha256: str | None, label: str
) -> Path:
    """Put a dataset file a user already has (not a published D4RL one) at ``dest``.

    The file must exist; with ``sha256`` it must also match it, so a config can pin the exact bytes of a
    shared dataset the way the D4RL tasks pin the published ones.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise DataError(f"{source}: dataset file of {label} not found (task.dataset.path)")
    verify_file(source, size=None, sha256=sha256, label=label)
    return _place(source, Path(dest))


def _find_cached(entry: D4RLFile, dest: Path, search_dirs: Sequence[str | Path] | None) -> Path | None:
    """The first ``entry.filename`` in the search directories (skipping ``dest`` itself, already checked)."""
    for directory in default_search_dirs() if search_dirs is None else search_dirs:
        candidate = Path(directory).expanduser() / entry.filename
        if candidate.is_file() and not (dest.exists() and candidate.samefile(dest)):
            return candidate
    return None


def _place(source: Path, dest: Path) -> Path:
    """Link (free, no extra disk) or else copy ``source`` beside ``dest``, then rename it into place atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
