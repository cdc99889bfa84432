"""The run directory as a local path or an fsspec URL (s3://bucket/run, gs://…), so that a
multi-node run needs no shared file system: the files the trainer reads and writes in it
(config.yaml, tokenizer.json, the logs, metrics/rank*.json) go through here, and its
checkpoints ({run_dir}/checkpoints) through vlm.checkpoint.store, which takes URLs too.

Files are written whole: locally through a temporary name and a rename (a reader sees the
old file or the new one, also after a crash); on an object store one PUT, which is atomic
per object. Credentials and endpoints come from fsspec's usual sources, as for
`train.checkpoint_dir` (vlm.checkpoint.store): for S3 the AWS variables, e.g.
AWS_ENDPOINT_URL for an S3-compatible store.

An object store has no append. A log (RunLog) is therefore kept in a local copy under
scratch_dir() and the whole file is uploaded when it is synced: on flush() at most every
`upload_every_s` seconds, at every checkpoint and on close. The trade-off: each upload
costs the whole log (a few MB for a long run) and a crash loses the rows logged since the
last upload, which are exactly the steps a resume runs and logs again (the log is cut
back to the checkpoint's step on resume: vlm.train.steplog.truncate_log).

Scratch space that must be a local directory (DeepSpeed's checkpoint staging, a
downloaded checkpoint, a universal-format conversion, a remote log's local copy) lives in
the run directory when it is local, else under
{tempfile.gettempdir()}/vlm-cache/{hash of the URL}: never in the working directory."""
from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

from vlm.checkpoint.layout import durable_write, is_remote

__all__ = ["RunLog", "append_text", "exists", "is_remote", "join", "list_names", "open_log", "read_text", "remove",
           "scratch_dir", "write_text"]

SCRATCH_ROOT = "vlm-cache"  # under tempfile.gettempdir(), for remote run directories


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def join(base: str | Path, *names: str) -> str:
    """`base`/names: a URL stays a URL (s3://b/run + a -> s3://b/run/a), a path a path."""
    base = str(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
    return str(Path(base, *names))


def exists(path: str | Path) -> bool:
    path = str(path)
    if not is_remote(path):
        return Path(path).exists()
    fs, p = _fs(path)
    return fs.exists(p)


def read_text(path: str | Path) -> str:
    """The file's text; FileNotFoundError naming `path` when there is none."""
    path = str(path)
    if not is_remote(path):
        return Path(path).read_text()
    fs, p = _fs(path)
    try:
        return fs.cat_file(p).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None


def write_text(path: str | Path, text: str) -> None:
    """Writes the whole file atomically (a local temporary file renamed into place; one PUT
    on an object store); a local parent directory is created."""
    path = str(path)
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        durable_write(Path(path), text.encode())
        return
    fs, p = _fs(path)
    fs.pipe_file(p, text.encode())


def remove(path: str | Path) -> None:
    """Deletes the file; nothing when there is none."""
    path = str(path)
    if not is_remote(path):
        Path(path).unlink(missing_ok=True)
        return
    fs, p = _fs(path)
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


def list_names(path: str | Path) -> list[str]:
    """The names of the files directly in directory `path`, sorted; [] when there is none."""
    path = str(path)
    if not is_remote(path):
        return sorted(p.name for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else []
    fs, p = _fs(path)
    try:
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=True, refresh=True)
                      if e["type"] == "file")
    except FileNotFoundError:
        return []


def append_text(path: str | Path, text: str) -> None:
    """Appends `text`; on an object store by reading and rewriting the whole object (for
    rare, small appends such as one evaluation's row; a step log uses RunLog)."""
    if not is_remote(str(path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        return
    old = read_text(path) if exists(path) else ""
    write_text(path, old + text)


def scratch_dir(run_dir: str | Path) -> Path:
    """A local directory for the run's scratch files: the run directory itself when it is
    local, else {tmp}/vlm-cache/{sha256 of the URL, 16 hex digits} (the same on every
    process of a node, so a node converts or downloads a checkpoint once)."""
    run_dir = str(run_dir)
    if not is_remote(run_dir):
        return Path(run_dir)
    digest = hashlib.sha256(run_dir.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / SCRATCH_ROOT / digest


class RunLog:
    """An append-only text log at a path or URL (write, flush, sync, close, as a file).
    Local: a file opened for appending. Remote: a local copy (started from the remote
    file, if any) uploaded whole by sync(), by flush() once `upload_every_s` seconds have
    passed since the last upload, and by close()."""

    def __init__(self, path: str | Path, *, scratch: Path, upload_every_s: float = 30.0):
        self.path = str(path)
        self.remote = is_remote(self.path)
        self.upload_every_s = upload_every_s
        if self.remote:
            self.local = Path(scratch) / self.path.rstrip("/").rsplit("/", 1)[-1]
            self.local.parent.mkdir(parents=True, exist_ok=True)
            self.local.write_text(read_text(self.path) if exists(self.path) else "")
        else:
            self.local = Path(self.path)
            self.local.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.local, "a")
        self._uploaded = time.monotonic()

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        """Locally at once; uploaded when the interval has passed. A failed upload is only
        reported: the next flush, sync or close uploads the whole log again."""
        self._file.flush()
        if self.remote and time.monotonic() - self._uploaded >= self.upload_every_s:
            try:
                self.sync()
            except OSError as e:
                self._uploaded = time.monotonic()  # the next try after another interval
                print(f"warning: could not upload {self.path} ({e}); trying again later", flush=True)

    def sync(self) -> None:
        """Everything written so far is in the log (uploaded, for a remote one)."""
        self._file.flush()
        if self.remote:
            fs, p = _fs(self.path)
            fs.put_file(str(self.local), p)
            self._uploaded = time.monotonic()

    def close(self) -> None:
        if self._file.closed:
            return
        self.sync()
        self._file.close()


def open_log(run_dir: str | Path, name: str, **kwargs) -> RunLog:
    """The run's log `name` (e.g. train_log.jsonl) opened for appending, as a RunLog."""
    return RunLog(join(run_dir, name), scratch=scratch_dir(run_dir), **kwargs)
