"""A run directory on object storage (s3://, gs://, any URI pyarrow.fs reads).

The stages keep working in a local folder, the driver's mirror of the run; the bucket is the run's
truth, which every node and every later driver reads. Object stores have no rename, so the local
guarantees are kept another way:

- **Stage complete = its marker exists.** Before any file of a stage's new output reaches the bucket
  (a worker's upload, or the publishing of the finished stage), its marker there is deleted: the old
  output reads as not done from then on, and is untouched until then (a stage that fails before it
  keeps its last output, as on a disk). The files go one object at a time (each PUT is atomic); keys of
  the older output that the new one lacks are deleted; the marker `_stage.json` is written last and
  lists every file with its size and SHA-256. A folder without a marker is never taken as complete, and a reader
  checks each file it fetches against the marker, so it never mixes two generations.
- **Run lock = a lease object** (`.lock.json`: owner and heartbeat). A driver takes it only when it is
  absent or its heartbeat is older than the lease's time to live, then reads it back after a settle
  delay (stores are strongly consistent on read-after-write, S3 since 2020): of two drivers racing,
  the one whose write landed last holds it and the other stops. The holder renews it in a thread.
- **Uploaded once, cached by content.** A worker that builds a stage's files (a compressed model) uploads
  them itself; a worker that reads them (a trial) fetches them into a node-local cache under the
  SHA-256 of the marker's entries for that folder, so trials on the same node download a model once,
  and a rerun with the same content downloads nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from damoc.rundir import RunLocked
from damoc.spec import is_uri

log = logging.getLogger("damoc.store")

MARKER = "_stage.json"
LOCK = ".lock.json"
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # large files the driver's mirror never needs
CHUNK = 8 << 20


def is_remote(path: str | os.PathLike | None) -> bool:
    """A location only reachable through a filesystem client (not a local or mounted path)."""
    return bool(path) and is_uri(str(path)) and not str(path).startswith("file://")


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI. S3 takes its endpoint and credentials from the
    environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as every AWS client does."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri.rstrip("/"))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def cache_root() -> Path:
    """This node's cache (the real LLMs' wheels, a remote run's mirror, the objects trials read):
    DAMOC_CACHE, else ~/.cache/damoc."""
    return Path(os.environ.get("DAMOC_CACHE") or Path.home() / ".cache" / "damoc")


def mirror_dir(uri: str) -> Path:
    """The driver's local working copy of a remote run (stable per URI, so a rerun reuses it)."""
    return cache_root() / "runs" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def local_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of a folder's files, leaving out hidden ones (temp files)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            out[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def put_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def get_bytes(uri: str) -> bytes | None:
    """The object's bytes, or None when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read()


def get_json(uri: str) -> Any | None:
    data = get_bytes(uri)
    try:
        return None if data is None else json.loads(data)
    except ValueError:
        return None


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def remote_keys(uri: str) -> list[str]:
    """Relative keys of every object under a prefix ([] when there is none)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


def upload_folder(folder: Path, uri: str) -> dict[str, dict[str, Any]]:
    """Every (non-hidden) file of `folder` to `uri`/..., one object each; returns what was written."""
    files = local_files(folder)
    fs, root = filesystem(uri)
    for rel in files:
        with open(folder / rel, "rb") as src, fs.open_output_stream(f"{root}/{rel}") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    return files


def download(uri: str, files: dict[str, dict[str, Any]], dest: Path) -> None:
    """`files` (relative to `uri`) into `dest`, each checked against its size and SHA-256."""
    fs, root = filesystem(uri)
    for rel, meta in files.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root}/{rel}") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        if target.stat().st_size != meta["size"] or sha256_file(target) != meta["sha256"]:
            raise OSError(f"{uri}/{rel} does not match its stage marker (rewritten while being read?)")


# ---------------------------------------------------------------- stages on the bucket


class RemoteRun:
    """The remote side of a run directory: stage markers, publishing, pulling into the mirror."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    def marker(self, output: str) -> dict[str, Any] | None:
        m = get_json(join(self.uri, output, MARKER))
        return m if isinstance(m, dict) and "fingerprint" in m else None

    def begin(self, output: str) -> None:
        """The stage is running: from now on it reads as not done, wherever it is looked at."""
        delete(join(self.uri, output, MARKER))

    def publish(self, output: str, folder: Path, uploaded: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The finished local folder (its marker inside) to the bucket: files, then stale keys out, then
        the marker, last. `uploaded`: files workers already put there (not in the local folder)."""
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        self.begin(output)  # the old output stops being complete before any of its files is replaced
        files = upload_folder(folder, join(self.uri, output))
        files.pop(MARKER, None)
        files.update(uploaded)
        fs, root = filesystem(join(self.uri, output))
        for rel in remote_keys(join(self.uri, output)):
            if rel not in files and rel != MARKER:
                with contextlib.suppress(FileNotFoundError):
                    fs.delete_file(f"{root}/{rel}")
        marker["files"] = files
        put_bytes(join(self.uri, output, MARKER), json.dumps(marker, indent=2, sort_keys=True).encode())
        return marker

    def pull(self, output: str, folder: Path, marker: dict[str, Any]) -> None:
        """A published stage into the mirror, weights left out (only workers read those)."""
        small = {rel: m for rel, m in marker.get("files", {}).items() if not rel.endswith(WEIGHTS)}
        tmp = folder.with_name(f".{folder.name}.pull-{uuid.uuid4().hex[:8]}")
        download(join(self.uri, output), small, tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    def put_file(self, rel: str, path: Path) -> None:
        put_bytes(join(self.uri, rel), path.read_bytes())


# ---------------------------------------------------------------- reading on a worker


def marker_for(uri: str) -> tuple[str, dict[str, Any]]:
    """(the stage folder's URI, its marker) for a URI inside a published stage."""
    parts = uri.rstrip("/").split("/")
    for cut in range(len(parts) - 1, 3, -1):  # s3://bucket/... : never above the bucket
        stage = "/".join(parts[:cut])
        m = get_json(join(stage, MARKER))
        if isinstance(m, dict) and "files" in m:
            return stage, m
    raise FileNotFoundError(f"{uri}: not inside a finished stage (no {MARKER} with a file list above it)")


def localize(path: str) -> str:
    """A local path for a stage output: itself when local, else a copy in this node's cache, keyed by
    the content the marker lists (one download per node and content, shared by every trial there)."""
    if not is_remote(path):
        return path
    stage, marker = marker_for(path)
    sub = path.rstrip("/")[len(stage) + 1:]
    files = {rel: m for rel, m in marker["files"].items() if rel == sub or rel.startswith(sub + "/")}
    if not files:
        raise FileNotFoundError(f"{path}: the stage's marker lists no such file or folder")
    key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:24]
    root = cache_root() / "objects"
    done = root / key
    if not done.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{key}.lock", "w") as lock:  # one download per node; the others wait for it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.is_dir():
                tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    download(stage, files, tmp)
                    tmp.rename(done)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                log.info("cache: %s fetched into %s (%d files)", path, done, len(files))
    return str(done / sub)


# ---------------------------------------------------------------- the run lock


class LeaseHeld(RunLocked):
    pass


class Lease:
    """An advisory lock on a remote run: an object naming its holder, renewed while held."""

    def __init__(self, uri: str, ttl_s: float = 60.0, settle_s: float = 1.0):
        self.uri, self.ttl_s, self.settle_s = join(uri, LOCK), ttl_s, settle_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _write(self) -> None:
        put_bytes(self.uri, json.dumps({"owner": self.owner, "heartbeat": time.time()}).encode())

    def holder(self) -> dict[str, Any] | None:
        """The lease as it is, when someone holds it and has renewed it within its time to live."""
        cur = get_json(self.uri)
        if isinstance(cur, dict) and time.time() - float(cur.get("heartbeat", 0)) < self.ttl_s:
            return cur
        return None

    def acquire(self) -> None:
        try:
            self._take()
        except OSError as exc:
            raise PermissionError(f"run directory {self.uri.rsplit('/', 1)[0]} cannot be read or written: "
                                  f"{exc} (credentials and endpoint come from the environment: "
                                  "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)") from None
        self._thread = threading.Thread(target=self._renew, name="damoc-lease", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        cur = self.holder()
        if cur and cur.get("owner") != self.owner:
            raise LeaseHeld(f"{self.uri} is held by {cur['owner']} (renewed "
                            f"{time.time() - cur['heartbeat']:.0f}s ago)")
        self._write()
        time.sleep(self.settle_s)  # a racing driver's write lands within this; the last one wins
        cur = get_json(self.uri)
        if not isinstance(cur, dict) or cur.get("owner") != self.owner:
            raise LeaseHeld(f"{self.uri} was taken by {(cur or {}).get('owner', '?')} at the same time")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                cur = get_json(self.uri)
                if isinstance(cur, dict) and cur.get("owner") != self.owner:
                    self.lost = True
                    log.error("run lock %s was taken over by %s", self.uri, cur.get("owner"))
                    return
                self._write()
            except OSError as exc:  # a blip: the next renewal tries again, well inside the time to live
                log.warning("run lock %s: renewal failed: %s", self.uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            cur = get_json(self.uri)
            if isinstance(cur, dict) and cur.get("owner") == self.owner:
                delete(self.uri)

    @contextlib.contextmanager
    def held(self) -> Iterator[Lease]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()
