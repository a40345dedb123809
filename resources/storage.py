"""Object storage behind one small interface.

The assets read media from ``ASR_SOURCE_URI`` and write every output under ``ASR_OUTPUT_ROOT``. Both are object stores
addressed by relative keys (``audio_wav/shard-00000.parquet``). The embedded default is a local folder; the interface
is shaped for an object store (whole-object reads and atomic whole-object writes, recursive sorted listing) so the OSS
implementation slots in beside it.
"""

from __future__ import annotations

import io
import os
import secrets
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field


class StorageConfigError(ValueError):
    """A storage uri or root that cannot be used; the message says what to fix."""


class UnsafeKeyError(ValueError):
    """An object key that would escape the store's root (``..``, absolute, NUL, control characters)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a listing.

    Attributes:
        key: path relative to the store root, ``/``-separated.
        size: size in bytes.
        mtime: last modification, seconds since the epoch (UTC).
    """

    key: str
    size: int
    mtime: float


def check_key(key: str) -> PurePosixPath:
    """Validates an object key and returns it as a relative posix path.

    Raises:
        UnsafeKeyError: the key is empty, absolute, has ``.``/``..`` parts, NUL or control characters.
    """
    if not key or "\x00" in key or any(unicodedata.category(ch) == "Cc" for ch in key):
        raise UnsafeKeyError(f"unsafe object key {key!r}: empty or contains control characters")
    path = PurePosixPath(key)
    if path.is_absolute() or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise UnsafeKeyError(f"unsafe object key {key!r}: must be relative without '.' or '..' parts")
    return path


class ObjectStore(ABC):
    """A flat namespace of objects under one root uri."""

    @property
    @abstractmethod
    def root_uri(self) -> str:
        """The uri of the root, e.g. ``file:///data/out``."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yields every object under ``prefix`` (recursively), sorted by key."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object. Raises FileNotFoundError when it does not exist."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Writes the object atomically: readers see the old object or the whole new one, never a part."""

    @abstractmethod
    def put_file(self, key: str, src: Path) -> None:
        """Moves (or uploads) a finished local file into the store atomically; ``src`` is consumed."""

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file holding the object's bytes, for libraries that need a path (FFmpeg, soundfile)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Removes the object; a missing object is not an error."""

    @abstractmethod
    def scratch_dir(self) -> Path:
        """A local folder for files being built before ``put_file`` (cheap to move into the store from there)."""

    def uri_of(self, key: str) -> str:
        """The full uri of an object."""
        check_key(key)
        return f"{self.root_uri.rstrip('/')}/{key}"


class LocalStore(ObjectStore):
    """A folder on the local file system. Writes go to a hidden temp file in the same folder, then ``os.replace``."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    @property
    def root(self) -> Path:
        return self._root

    @property
    def root_uri(self) -> str:
        # Not percent-encoded: uris are identifiers shown to people and hashed into ids, like OSS keys.
        return f"file://{self._root}"

    def _path(self, key: str) -> Path:
        path = self._root.joinpath(*check_key(key).parts)
        # Defence in depth against symlinked folders inside the root.
        if not path.resolve().is_relative_to(self._root):
            raise UnsafeKeyError(f"unsafe object key {key!r}: resolves outside {self._root}")
        return path

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Object-store semantics: every key that starts with the prefix string, so walk the prefix's folder part.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(folder) if folder else self._root
        if not base.is_dir():
            return
        found: list[ObjectInfo] = []
        stack = [base]
        while stack:
            current = stack.pop()
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue  # hidden: unfinished atomic writes, scratch space, .DS_Store and the like
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=True):
                        key = Path(entry.path).relative_to(self._root).as_posix()
                        if key.startswith(prefix):
                            stat = entry.stat()
                            found.append(ObjectInfo(key, stat.st_size, stat.st_mtime))
        # Sorted so listings are deterministic and a cursor (the last key seen) is meaningful.
        found.sort(key=lambda info: info.key)
        yield from found

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def _temp_beside(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._temp_beside(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, key: str, src: Path) -> None:
        path = self._path(key)
        tmp = self._temp_beside(path)
        try:
            # A copy when src is on another file system; a rename otherwise. Either way the final step is atomic.
            if _same_device(src, path.parent):
                os.replace(src, tmp)
            else:
                _copy(src, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
            src.unlink(missing_ok=True)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def scratch_dir(self) -> Path:
        # Inside the root so put_file is a rename; hidden, so listings never show it.
        path = self._root / ".scratch"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


def open_store(uri: str, *, must_exist: bool, what: str) -> ObjectStore:
    """Builds the store for a uri: ``file:///abs``, ``file://rel``, or a plain path.

    Args:
        uri: where the store lives.
        must_exist: fail when the folder does not exist (sources); otherwise create it (outputs).
        what: the setting's name, for error messages (``ASR_SOURCE_URI``).
    """
    if not uri:
        raise StorageConfigError(f"{what} is empty: set it to a folder or a file:// uri")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.netloc + parsed.path) if parsed.scheme == "file" else uri).expanduser()
        if must_exist and not path.is_dir():
            raise StorageConfigError(f"{what}={uri!r}: folder {path.resolve()} does not exist")
        path.mkdir(parents=True, exist_ok=True)
        return LocalStore(path)
    if parsed.scheme == "oss":
        raise StorageConfigError(f"{what}={uri!r}: oss:// storage is not available in this version; use a local folder")
    raise StorageConfigError(f"{what}={uri!r}: unsupported scheme {parsed.scheme!r} (use a folder or file://)")


def read_table(store: ObjectStore, key: str, schema: pa.Schema) -> pa.Table:
    """Reads a Parquet object as ``schema`` (an empty table when it does not exist yet)."""
    if not store.exists(key):
        return schema.empty_table()
    table = pq.read_table(io.BytesIO(store.read_bytes(key)))
    # Tables written by an earlier version may lack columns added since: nullable ones read as nulls.
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise ValueError(f"{store.uri_of(key)}: column {field.name!r} is missing and cannot be null")
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def write_table(store: ObjectStore, key: str, table: pa.Table) -> None:
    """Writes a Parquet object atomically (zstd, deterministic bytes for the same table)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put_bytes(key, buf.getvalue())


class StorageResource(dg.ConfigurableResource):
    """Where media comes from and where every output goes."""

    source_uri: str = Field(description="Folder (or file:// uri) listed recursively for media. Env: ASR_SOURCE_URI.")
    output_root: str = Field(
        default="./data/out", description="Folder (or file:// uri) under which all outputs live. Env: ASR_OUTPUT_ROOT."
    )

    def source(self) -> ObjectStore:
        """The media source; fails fast when it does not exist."""
        return open_store(self.source_uri, must_exist=True, what="ASR_SOURCE_URI")

    def output(self) -> ObjectStore:
        """The output root; created when missing."""
        return open_store(self.output_root, must_exist=False, what="ASR_OUTPUT_ROOT")
