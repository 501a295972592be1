"""Where a state's data files live: a local folder by default, any fsspec filesystem by configuration.

The trunk cache, the slice Parquet files, the stage checkpoints and the memorization artifacts
(s3t_ops/memorization/artifacts.py, with its own commit protocol) are read and written through one
`Storage`: a root URL (a plain path, `file://...`, `s3://bucket/prefix`, `gs://...`, `memory://...`)
and paths relative to it (`checkpoints/ab/<key>.safetensors`). The ledger, its lock, `secret.key` and
`config.json` are not data files: they stay in the local state folder (docs/scaling.md, "Storage").

Crash safety is kept per kind of filesystem:
- local: a file is written under `<name>.tmp-<pid>`, fsynced and renamed over its final name
  (`s3t_ops/files.py`), exactly as before storage was configurable; repair removes the temporaries of
  dead writers;
- anything else (an object store): an object is written whole in one `pipe` (one PUT), and object
  stores make an object visible whole or not at all, so a reader never sees half of one and there are
  no temporaries to clean. What a crash can leave is a whole object without a ledger row (a checkpoint
  put just before its row): repair lists the checkpoint objects and deletes those orphans, as it does
  files. A rewrite (erasure) replaces an object in one put: the old or the new content is in place.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from s3t_ops.files import TMP_MARK, remove_temporaries, tmp_path, write_bytes

LOCAL_PROTOCOLS = ("file", "local")
DATA_PREFIXES = ("trunk", "slices", "checkpoints", "memorization")


class StorageError(RuntimeError):
    """The storage URL cannot be used (unreachable, refused, or not a local folder where one is needed)."""


def protocol_of(url: str | os.PathLike) -> str:
    from fsspec.utils import get_protocol

    return get_protocol(str(url))


def check_url(url: str) -> None:
    """The URL's protocol is known to fsspec and its implementation is installed (ValueError naming it
    otherwise). Nothing is contacted: reachability is checked when a state is created or opened."""
    import fsspec

    protocol = protocol_of(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ValueError(f"unknown protocol {protocol!r} in {url!r} (fsspec knows: file, memory, s3, gs, ...)") from None
    except ImportError as exc:
        raise ValueError(f"{url!r} needs a package that is not installed: {exc}") from None


@dataclass
class Staged:
    """A file written but not yet under its name: `place()` puts it there (inside the ledger transaction
    that records it), `discard()` drops it."""

    place: Callable[[], None]
    discard: Callable[[], None]


class Storage:
    """Data files under one root URL; paths are relative, '/'-separated."""

    def __init__(self, url: str | os.PathLike, scratch: Path | None = None):
        """`scratch`: a local folder for files that must exist on disk before they are put (a figure, a
        Parquet file). The engine passes one inside the state folder, so what a crash leaves there is
        still the state's own (repair removes it) and never escapes erasure in the system's temp dir."""
        from fsspec.core import url_to_fs

        self.url = str(url)
        self.scratch = scratch
        self.local = protocol_of(url) in LOCAL_PROTOCOLS
        self.fs, root = url_to_fs(self.url)
        self.root = root.rstrip("/")
        self._local_root = Path(root) if self.local else None

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def _full(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def location(self, rel: str) -> str:
        """Where a file is, for messages and reports: a local path, or the object's URL as configured."""
        if self.local:
            return str(self._local_root / rel)
        return f"{self.url.rstrip('/')}/{rel}"

    def local_path(self, rel: str = "") -> Path:
        """The local file (or folder) of `rel`: only for local storage, e.g. to map a file instead of reading it."""
        if not self.local:
            raise StorageError(f"{self.url} is not a local folder")
        return self._local_root / rel if rel else self._local_root

    # --- reading --------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        if self.local:
            return (self._local_root / rel).is_file()
        return self.fs.isfile(self._full(rel))

    def stamp(self, rel: str) -> Hashable | None:
        """Changes whenever the file is rewritten (a cache of its contents is valid while it is equal); None: absent."""
        if self.local:
            try:
                st = (self._local_root / rel).stat()
            except FileNotFoundError:
                return None
            return (st.st_size, st.st_mtime_ns)
        try:
            return self.fs.ukey(self._full(rel))
        except FileNotFoundError:
            return None

    def read_bytes(self, rel: str) -> bytes:
        """FileNotFoundError when absent."""
        if self.local:
            return (self._local_root / rel).read_bytes()
        return self.fs.cat_file(self._full(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file (a header without reading the whole object)."""
        if self.local:
            with open(self._local_root / rel, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        return self.fs.cat_file(self._full(rel), start=start, end=end)

    def open(self, rel: str) -> IO[bytes]:
        """A binary file object for reading (e.g. for pandas.read_parquet)."""
        if self.local:
            return open(self._local_root / rel, "rb")
        return self.fs.open(self._full(rel), "rb")

    def glob(self, pattern: str) -> list[str]:
        """Relative paths of the files matching `pattern` (relative, fsspec glob syntax), sorted."""
        if self.local:
            return sorted(p.relative_to(self._local_root).as_posix() for p in self._local_root.glob(pattern) if p.is_file())
        prefix = self.root + "/"
        return sorted(p[len(prefix):] for p in self.fs.glob(self._full(pattern)) if p.startswith(prefix))

    def files(self, prefix: str) -> list[str]:
        """Relative paths of every file under the folder `prefix`, at any depth, sorted ([]: none)."""
        if self.local:
            base = self._local_root / prefix
            return sorted(p.relative_to(self._local_root).as_posix() for p in base.rglob("*") if p.is_file())
        root = self.root + "/"
        return sorted(p[len(root):] for p in self.fs.find(self._full(prefix)) if p.startswith(root))

    # --- writing --------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        """Atomic: a crash leaves the old content or the new one (see the module's docstring). Returns the location."""
        if self.local:
            write_bytes(self._local_root / rel, data)
        else:
            self._put(rel, data)
        return self.location(rel)

    def _put(self, rel: str, data: bytes) -> None:
        """One put of the whole object; the parent folder is made first for filesystems that have folders
        (on an object store it is a no-op)."""
        path = self._full(rel)
        self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def stage(self, rel: str, data: bytes) -> Staged:
        """Prepare a write that the caller commits later: locally a fsynced temporary renamed by `place`;
        on an object store the put itself (nothing is written before `place`)."""
        if not self.local:
            return Staged(place=lambda: self._put(rel, data), discard=lambda: None)
        final = self._local_root / rel
        tmp = write_bytes(tmp_path(final), data)
        return Staged(place=lambda: os.replace(tmp, final), discard=lambda: tmp.unlink(missing_ok=True))

    def remove(self, rel: str) -> bool:
        """True when a file was there."""
        if self.local:
            path = self._local_root / rel
            if path.is_file():
                path.unlink()
                return True
            return False
        try:
            self.fs.rm_file(self._full(rel))
        except FileNotFoundError:
            return False
        return True

    def remove_temporaries(self, prefix: str) -> list[str]:
        """Temporaries of dead writers under `prefix` (locations); an object store has none (puts are whole)."""
        if not self.local:
            return []
        return [str(p) for p in remove_temporaries(self._local_root / prefix)]

    # --- a new state ----------------------------------------------------------------------------
    def clear(self) -> None:
        """Remove every data file (`s3t demo --fresh` replacing a state stored at this URL)."""
        for prefix in DATA_PREFIXES:
            if self.fs.exists(self._full(prefix)):
                self.fs.rm(self._full(prefix), recursive=True)

    def check_empty(self) -> None:
        """Reachable and holding no data files (one URL per state: another state's checkpoints would mix in).
        StorageError naming the URL otherwise."""
        try:
            found = [p for p in DATA_PREFIXES if self.fs.exists(self._full(p))]
        except Exception as exc:  # each filesystem raises its own errors (credentials, network, permissions)
            raise StorageError(f"storage {self.url} is unreachable: {' '.join(str(exc).split()) or type(exc).__name__}") from None
        if found:
            raise StorageError(f"storage {self.url} already holds {', '.join(found)}/ of another state; use one URL per state")


def scratch_dir(storage: Storage, name: str) -> Path:
    """A new local folder to stage `name`'s files in: under the storage's scratch folder when it has one,
    named `<name>-<random>.tmp-<pid>` so that repair (`files.remove_temporaries`) can tell a crashed
    writer's leftovers from a live one's."""
    import tempfile

    base = storage.scratch
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", suffix=f"{TMP_MARK}{os.getpid()}", dir=base))
