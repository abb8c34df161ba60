"""Downloading D4RL files against a local HTTP server that drops, stalls, fails and ignores Range requests."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from trifle.data import d4rl_download
from trifle.data.d4rl_download import (
    D4RL_FILES,
    d4rl_file,
    d4rl_url,
    download_file,
    fetch_d4rl,
    partial_path,
    sha256_of,
    verify_file,
)
from trifle.data.d4rl_format import load_dataset, save_dataset
from trifle.errors import ConfigError, DataError

NAME = "hopper-medium-replay-v2"
FILENAME = "hopper_medium_replay-v2.hdf5"


@dataclass
class Served:
    """A generated D4RL-layout hdf5 file: its bytes and checksum, as the server publishes them."""

    path: Path
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """A hopper-shaped dataset (11-D observations, 3-D actions) with two episodes."""
    rng = np.random.default_rng(0)
    n = 300
    terminals, timeouts = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    terminals[120], timeouts[n - 1] = True, True
    arrays = {
        "observations": rng.normal(size=(n, 11)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    path = tmp_path_factory.mktemp("published") / FILENAME
    save_dataset(path, arrays, {"env": "hopper"})
    return Served(path=path, body=path.read_bytes())


@dataclass
class ServerState:
    """What the handler serves and how it misbehaves; ``ranges`` records each request's Range header."""

    files: dict[str, bytes]
    mode: str = "normal"
    ranges: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    """Serves ``ServerState.files`` with Range support; ``mode`` picks the failure to simulate.

    normal | truncate_once | truncate_always | stall_once | error500 | no_range
    """

    server: _Server

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            state.ranges.append(self.headers.get("Range"))
            first = len(state.ranges) == 1
        if state.mode == "error500":
            self.send_error(500, "Internal Server Error")
            return
        body = state.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = self._range_start(state.mode)
        if start is not None and start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if start is None:
            start = 0
            self.send_response(200)
        else:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self._send_body(payload, state.mode, first)

    def _range_start(self, mode: str) -> int | None:
        header = self.headers.get("Range")
        if header is None or mode == "no_range":
            return None
        match = re.fullmatch(r"bytes=(\d+)-", header)
        assert match, header
        return int(match[1])

    def _send_body(self, payload: bytes, mode: str, first: bool) -> None:
        """Send it all, or (per mode) half of it and then drop or stall the connection."""
        half = payload[: len(payload) // 2]
        if mode == "truncate_always" or (mode == "truncate_once" and first):
            self.wfile.write(half)
            self.close_connection = True
        elif mode == "stall_once" and first:
            self.wfile.write(half)
            time.sleep(0.5)
            self.close_connection = True
        else:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        """Keep pytest output clean."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState


@pytest.fixture
def server(served: Served) -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.state = ServerState(files={FILENAME: served.body})
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(d4rl_download, "_RETRY_DELAY_S", 0.0)


def base_url(server: _Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def url_of(server: _Server) -> str:
    return f"{base_url(server)}/{FILENAME}"


def download(server: _Server, served: Served, dest: Path, **kwargs: object) -> Path:
    options = {"size": served.size, "sha256": served.sha256, "label": NAME, "progress": False}
    options |= {"chunk_size": 1024} | kwargs
    return download_file(url_of(server), dest, **options)  # type: ignore[arg-type]


def assert_downloaded(dest: Path, served: Served) -> None:
    assert dest.read_bytes() == served.body
    assert not partial_path(dest).exists()
    assert load_dataset(dest).observations.shape == (300, 11)


# --- registry ---------------------------------------------------------------------------------------


def test_registry_has_the_nine_v2_datasets() -> None:
    expected = {
        f"{env}-{kind}-v2"
        for env in ("hopper", "halfcheetah", "walker2d")
        for kind in ("medium", "medium-replay", "medium-expert")
    }
    assert set(D4RL_FILES) == expected
    for name, entry in D4RL_FILES.items():
        assert entry.name == name and name.startswith(entry.env + "-")
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.size > 50_000_000
    assert d4rl_file(NAME).filename == FILENAME
    assert d4rl_file("halfcheetah-medium-expert-v2").size == 474567252


def test_url_uses_the_published_file_name() -> None:
    assert d4rl_url(NAME).endswith("gym_mujoco_v2/hopper_medium_replay-v2.hdf5")
    assert d4rl_url("walker2d-medium-v2", "http://mirror/x/") == "http://mirror/x/walker2d_medium-v2.hdf5"


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="hopper-medium-v2") as info:
        d4rl_file("hopper-random-v2")
    assert "'hopper-random-v2'" in str(info.value)
    assert all(name in str(info.value) for name in D4RL_FILES)


def test_verify_file_names_file_dataset_and_expectation(served: Served, tmp_path: Path) -> None:
    verify_file(served.path, size=served.size, sha256=served.sha256, label=NAME)
    assert sha256_of(served.path) == served.sha256
    with pytest.raises(
        DataError, match=rf"has {served.size} bytes, expected {served.size + 1} bytes"
    ) as info:
        verify_file(served.path, size=served.size + 1, sha256=None, label=NAME)
    assert str(served.path) in str(info.value) and NAME in str(info.value)
    with pytest.raises(DataError, match=f"expected sha256 {'a' * 64}"):
        verify_file(served.path, size=None, sha256="a" * 64, label=NAME)
    with pytest.raises(DataError, match="not found"):
        verify_file(tmp_path / "missing.hdf5", size=None, sha256=None, label=NAME)


# --- download_file ----------------------------------------------------------------------------------


def test_download_writes_a_loadable_dataset(server: _Server, served: Served, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "dir" / FILENAME
    assert download(server, served, dest) == dest
    assert_downloaded(dest, served)
    assert server.state.ranges == [None]


def test_dropped_connection_is_resumed_with_a_range_request(
    server: _Server, served: Served, tmp_path: Path
) -> None:
    server.state.mode = "truncate_once"
    dest = tmp_path / FILENAME
    download(server, served, dest)
    assert_downloaded(dest, served)
    assert server.state.ranges == [None, f"bytes={served.size // 2}-"]


def test_stalled_connection_times_out_and_resumes(server: _Server, served: Served, tmp_path: Path) -> None:
    server.state.mode = "stall_once"
    dest = tmp_path / FILENAME
    download(server, served, dest, timeout=0.2)
    assert_downloaded(dest, served)
    assert server.state.ranges == [None, f"bytes={served.size // 2}-"]


def test_incomplete_transfer_keeps_the_partial_file_and_a_rerun_resumes_it(
    server: _Server, served: Served, tmp_path: Path
) -> None:
    server.state.mode = "truncate_always"
    dest = tmp_path / FILENAME
    with pytest.raises(DataError, match="incomplete") as info:
        download(server, served, dest, retries=2)
    part = partial_path(dest)
    have = part.stat().st_size
    message = str(info.value)
    assert f"{have} of {served.size} bytes" in message
    assert "rerun" in message and NAME in message and url_of(server) in message
    assert len(server.state.ranges) == 3 and 0 < have < served.size
    assert not dest.exists()
    assert served.body.startswith(part.read_bytes())

    server.state.mode = "normal"
    server.state.ranges.clear()
    download(server, served, dest)
    assert_downloaded(dest, served)
    assert server.state.ranges == [f"bytes={have}-"]


def test_complete_partial_file_is_only_verified(server: _Server, served: Served, tmp_path: Path) -> None:
    dest = tmp_path / FILENAME
    partial_path(dest).write_bytes(served.body)
    download(server, served, dest)
    assert_downloaded(dest, served)
    assert server.state.ranges == []


def test_complete_partial_file_of_unknown_size_gets_416_and_is_kept(
    server: _Server, served: Served, tmp_path: Path
) -> None:
    dest = tmp_path / FILENAME
    partial_path(dest).write_bytes(served.body)
    download(server, served, dest, size=None)
    assert_downloaded(dest, served)
    assert server.state.ranges == [f"bytes={served.size}-"]


def test_server_without_range_support_restarts_from_zero(
    server: _Server, served: Served, tmp_path: Path
) -> None:
    server.state.mode = "no_range"
    dest = tmp_path / FILENAME
    partial_path(dest).write_bytes(b"stale bytes from another file")
    download(server, served, dest)
    assert_downloaded(dest, served)
    assert server.state.ranges == ["bytes=29-"]


def test_http_500_is_retried_then_reported(server: _Server, served: Served, tmp_path: Path) -> None:
    server.state.mode = "error500"
    dest = tmp_path / FILENAME
    with pytest.raises(DataError, match="HTTP 500") as info:
        download(server, served, dest, retries=2)
    assert url_of(server) in str(info.value) and NAME in str(info.value)
    assert len(server.state.ranges) == 3
    assert not dest.exists()


def test_http_404_fails_at_once(server: _Server, served: Served, tmp_path: Path) -> None:
    dest = tmp_path / FILENAME
    url = f"{base_url(server)}/nope.hdf5"
    with pytest.raises(DataError, match="HTTP 404") as info:
        download_file(url, dest, size=None, sha256=None, label=NAME, progress=False, retries=3)
    assert url in str(info.value) and NAME in str(info.value)
    assert len(server.state.ranges) == 1
    assert not dest.exists()


def test_wrong_checksum_deletes_the_download(server: _Server, served: Served, tmp_path: Path) -> None:
    dest = tmp_path / FILENAME
    wrong = "0" * 64
    with pytest.raises(DataError, match=f"expected sha256 {wrong}") as info:
        download(server, served, dest, sha256=wrong)
    assert NAME in str(info.value) and served.sha256 in str(info.value)
    assert not partial_path(dest).exists() and not dest.exists()


def test_wrong_size_is_reported_before_downloading(server: _Server, served: Served, tmp_path: Path) -> None:
    dest = tmp_path / FILENAME
    with pytest.raises(DataError, match=rf"{served.size} bytes, expected {served.size + 7} bytes") as info:
        download(server, served, dest, size=served.size + 7)
    assert NAME in str(info.value)
    assert not partial_path(dest).exists() and not dest.exists()


def test_a_bad_download_never_replaces_an_existing_dest(
    server: _Server, served: Served, tmp_path: Path
) -> None:
    dest = tmp_path / FILENAME
    dest.write_bytes(b"previous")
    server.state.mode = "truncate_always"
    with pytest.raises(DataError, match="incomplete"):
        download(server, served, dest, retries=0)
    assert dest.read_bytes() == b"previous"


# --- fetch_d4rl -------------------------------------------------------------------------------------


def fetch(server: _Server, served: Served, dest: Path, **kwargs: object) -> Path:
    options = {"base_url": base_url(server), "size": served.size, "sha256": served.sha256, "progress": False}
    return fetch_d4rl(NAME, dest, **(options | kwargs))  # type: ignore[arg-type]


def test_fetch_downloads_when_nothing_is_cached(server: _Server, served: Served, tmp_path: Path) -> None:
    dest = tmp_path / "data" / f"{NAME}.hdf5"
    assert fetch(server, served, dest, search_dirs=[tmp_path / "empty"]) == dest
    assert_downloaded(dest, served)
    assert server.state.ranges == [None]


def test_fetch_reuses_a_verified_dest(server: _Server, served: Served, tmp_path: Path) -> None:
    dest = tmp_path / f"{NAME}.hdf5"
    dest.write_bytes(served.body)
    assert fetch(server, served, dest, search_dirs=[]) == dest
    assert server.state.ranges == []


def test_fetch_replaces_a_corrupt_dest(server: _Server, served: Served, tmp_path: Path) -> None:
    dest = tmp_path / f"{NAME}.hdf5"
    dest.write_bytes(b"corrupt")
    fetch(server, served, dest, search_dirs=[])
    assert_downloaded(dest, served)


def test_fetch_places_a_given_file(server: _Server, served: Served, tmp_path: Path) -> None:
    mine = tmp_path / "mine.hdf5"
    mine.write_bytes(served.body)
    dest = tmp_path / "data" / f"{NAME}.hdf5"
    fetch(server, served, dest, file=mine)
    assert_downloaded(dest, served)
    assert mine.read_bytes() == served.body
    assert server.state.ranges == []


def test_fetch_rejects_a_given_file_with_a_bad_checksum(
    server: _Server, served: Served, tmp_path: Path
) -> None:
    mine = tmp_path / "mine.hdf5"
    mine.write_bytes(served.body)
    dest = tmp_path / f"{NAME}.hdf5"
    wrong = "f" * 64
    with pytest.raises(DataError, match=f"expected sha256 {wrong}") as info:
        fetch(server, served, dest, file=mine, sha256=wrong)
    assert NAME in str(info.value) and str(mine) in str(info.value)
    assert not dest.exists() and server.state.ranges == []


def test_fetch_checks_the_published_checksum_by_default(
    server: _Server, served: Served, tmp_path: Path
) -> None:
    mine = tmp_path / "mine.hdf5"
    mine.write_bytes(served.body)
    with pytest.raises(DataError, match=f"expected {D4RL_FILES[NAME].size} bytes"):
        fetch_d4rl(NAME, tmp_path / "dest.hdf5", file=mine, progress=False)


def test_fetch_reports_a_missing_given_file(server: _Server, served: Served, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{NAME} not found"):
        fetch(server, served, tmp_path / "dest.hdf5", file=tmp_path / "missing.hdf5")


def test_fetch_finds_a_file_in_search_dirs(server: _Server, served: Served, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / FILENAME).write_bytes(served.body)
    dest = tmp_path / "data" / f"{NAME}.hdf5"
    fetch(server, served, dest, search_dirs=[tmp_path / "elsewhere", cache])
    assert_downloaded(dest, served)
    assert server.state.ranges == []


def test_fetch_searches_d4rl_dataset_dir_and_home_by_default(
    server: _Server, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_dir, home = tmp_path / "env", tmp_path / "home"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(env_dir))
    monkeypatch.setenv("HOME", str(home))
    home_cache = home / ".d4rl" / "datasets"
    home_cache.mkdir(parents=True)
    (home_cache / FILENAME).write_bytes(served.body)
    fetch(server, served, tmp_path / "a.hdf5")
    env_dir.mkdir()
    (env_dir / FILENAME).write_bytes(b"not the dataset")
    with pytest.raises(DataError, match=str(env_dir / FILENAME)):
        fetch(server, served, tmp_path / "b.hdf5")
    assert server.state.ranges == []


def test_fetch_rejects_a_corrupt_cached_file(server: _Server, served: Served, tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(served.body[:-1])
    with pytest.raises(DataError, match=rf"{served.size - 1} bytes, expected {served.size} bytes"):
        fetch(server, served, tmp_path / "dest.hdf5", search_dirs=[tmp_path])


# --- the `data` stage ---------------------------------------------------------------------------------


def test_data_stage_downloads_a_d4rl_task_that_labels_and_tokens_then_read(
    server: _Server, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m trifle data task=<a D4RL task>` fetches the file through the task config's URL and
    checksum, and the next stages read it: TT's -100 termination penalty lands on the terminal step."""
    from trifle.__main__ import main
    from trifle.data.labels import load_labeled
    from trifle.data.tokens import load_tokens

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    raw, labeled, tokens = (tmp_path / "data" / name for name in ("raw.hdf5", "labeled.npz", "tokens.npz"))
    common = [f"task={NAME}", "progress=false"]
    dataset = [
        f"task.dataset.base_url={base_url(server)}",
        f"task.dataset.size={served.size}",
        f"task.dataset.sha256={served.sha256}",
    ]
    assert main(["data", *common, *dataset, f"paths.raw={raw}"]) == 0
    assert raw.read_bytes() == served.body and (tmp_path / "data" / "raw.hdf5.run.json").is_file()
    assert main(["labels", *common, f"paths.raw={raw}", f"paths.labeled={labeled}"]) == 0
    assert load_labeled(labeled).rewards[120] == -100.0
    assert main(["tokens", *common, f"paths.labeled={labeled}", f"paths.tokens={tokens}"]) == 0
    data = load_tokens(tokens)
    assert (data.obs_dim, data.act_dim) == (11, 3) and data.tokens.max() < 100


def test_data_stage_with_a_wrong_checksum_fails_cleanly(
    server: _Server, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from trifle.__main__ import main

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    raw = tmp_path / "raw.hdf5"
    args = ["data", f"task={NAME}", "progress=false", f"task.dataset.base_url={base_url(server)}"]
    args.append(f"task.dataset.size={served.size}")
    assert main([*args, f"task.dataset.sha256={'0' * 64}", f"paths.raw={raw}"]) == 1
    err = capsys.readouterr().err
    assert NAME in err and "0" * 64 in err
    assert not raw.exists() and not partial_path(raw).exists()


def test_data_stage_takes_a_users_own_dataset_file(served: Served, tmp_path: Path) -> None:
    """generator 'file': a D4RL-layout file of one's own, pinned by sha256 when given; a file that is not
    in D4RL's layout fails in the `data` stage and leaves no output behind (the user's file stays)."""
    from trifle.config import compose
    from trifle.errors import DataError
    from trifle.stages import data

    cfg = compose(["task=hopper-random-local", "progress=false"])
    out = tmp_path / "raw" / "mine.hdf5"
    cfg["paths"]["raw"] = str(out)
    cfg["task"]["dataset"] = {"generator": "file", "path": str(served.path), "sha256": served.sha256}
    assert data.run(cfg) == out and out.read_bytes() == served.body
    cfg["task"]["dataset"]["sha256"] = "f" * 64
    out.unlink()
    with pytest.raises(DataError, match="f" * 64):
        data.run(cfg)
    bad = tmp_path / "not-d4rl.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    cfg["task"]["dataset"] = {"generator": "file", "path": str(bad)}
    with pytest.raises(DataError, match="not a readable hdf5"):
        data.run(cfg)
    assert not out.exists() and bad.is_file()
    cfg["task"]["dataset"] = {"generator": "file", "file": str(bad)}
    with pytest.raises(ConfigError, match="takes `path`"):
        data.run(cfg)
