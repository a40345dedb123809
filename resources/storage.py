"""Object storage behind one small interface.

The assets read media from ``ASR_SOURCE_URI`` and write every output under ``ASR_OUTPUT_ROOT``. Both are object stores
addressed by relative keys (``audio_wav/shard-00000.parquet``). The embedded default is a local folder; the interface
is shaped for an object store (whole-object reads and atomic whole-object writes, recursive sorted listing) so the OSS
implementation slots in beside it.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import io
import os
import random
import secrets
import shutil
import socket
import tempfile
import threading
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple
from urllib.parse import unquote, urlparse

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field


class StorageConfigError(ValueError):
    """A storage uri or root that cannot be used; the message says what to fix."""


# What check_key refuses, as one regex: control characters, an empty key, a leading slash, empty / . / .. parts.
UNSAFE_KEY_PATTERN = r"[\x00-\x1f\x7f-\x9f]|^$|^/|//|/$|(^|/)\.\.?(/|$)"


class UnsafeKeyError(ValueError):
    """An object key that would escape the store's root (``..``, absolute, NUL, control characters)."""


class ObjectInfo(NamedTuple):
    """One object in a listing (a NamedTuple rather than a dataclass: listings hold millions, and tuples are several
    times cheaper to build and to garbage-collect).

    Attributes:
        key: path relative to the store root, ``/``-separated. Bytes of a local name that are not valid UTF-8 are
            percent-escaped (``%FF``), so every key is a printable string (``problem`` then says ``InvalidName``).
        size: size in bytes.
        mtime: last modification, seconds since the epoch (UTC).
        version: what changes when the object is replaced under the same key: ``{size}-{mtime_ns}`` locally, the
            ETag on OSS, "" when unknown (a manifest row without size and mtime).
        problem: "" for a readable object; otherwise an entry the listing found that cannot be read as one, by kind
            (see ``LISTING_PROBLEMS``): the index dead-letters it, so it too gets an outcome.
    """

    key: str
    size: int
    mtime: float
    version: str = ""
    problem: str = ""


# Entries a listing reports but that are not readable objects, by kind, with what is wrong with them.
LISTING_PROBLEMS = {
    "InvalidName": "the file name is not valid UTF-8 (its bad bytes are shown percent-escaped); rename the file",
    "NotAFile": "not a regular file (a symbolic link to a folder, a dangling link, a pipe, socket or device); "
    "links to folders are not followed",
    "OutsideRoot": "a symbolic link that points outside the source folder; it is not read",
    "DirectoryObject": "an OSS key ending in '/' that holds data: a folder placeholder with content, not a media file",
}


def _percent_escape(error: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"%{b:02X}" for b in error.object[error.start : error.end]), error.end


codecs.register_error("asr-percent-escape", _percent_escape)


def printable_name(name: str) -> tuple[str, bool]:
    """A file system name (undecodable bytes held as surrogates, as ``os`` returns them) with those bytes
    percent-escaped, and whether there were any."""
    try:
        name.encode("utf-8")
        return name, False
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "asr-percent-escape"), True


def check_key(key: str) -> list[str]:
    """Validates an object key and returns its ``/``-separated parts.

    Raises:
        UnsafeKeyError: the key is empty, absolute, has empty, ``.`` or ``..`` parts, NUL or control characters.
    """
    # isprintable() is a fast C check that is False for every control character; only then look closer.
    if not key or (not key.isprintable() and any(unicodedata.category(ch) == "Cc" for ch in key)):
        raise UnsafeKeyError(f"unsafe object key {key!r}: empty or contains control characters")
    parts = key.split("/")
    if "" in parts or "." in parts or ".." in parts:
        raise UnsafeKeyError(f"unsafe object key {key!r}: must be relative without '.' or '..' parts")
    return parts


class ObjectStore(ABC):
    """A flat namespace of objects under one root uri."""

    @property
    @abstractmethod
    def root_uri(self) -> str:
        """The uri of the root, e.g. ``file:///data/out``."""

    @abstractmethod
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        """Yields every object under ``prefix`` (recursively) whose key sorts after ``start_after``, sorted by key."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object. Raises FileNotFoundError when it does not exist."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the object, fewer at its end (e.g. a header to sniff)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Writes the object atomically: readers see the old object or the whole new one, never a part."""

    @abstractmethod
    def put_file(self, key: str, src: Path) -> None:
        """Moves (or uploads) a finished local file into the store atomically; ``src`` is consumed."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Creates the object only if no object has that key: of two racing writers exactly one gets True (a lease's
        commit point). Readers see nothing or the whole object."""

    @abstractmethod
    def local_path(self, key: str, max_bytes: int | None = None, version: str = "") -> Path:
        """A local file holding the object's bytes, for libraries that need a path (FFmpeg, soundfile). ``version``
        (from the listing) keys a download cache, so a replaced object is never served from the old one's bytes.

        Raises:
            ObjectTooLarge: the object holds more than ``max_bytes`` (checked before any byte is downloaded).
            FileNotFoundError: the object is gone, or (OSS) holds another version than ``version`` now.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Removes the object; a missing object is not an error."""

    @abstractmethod
    def scratch_dir(self) -> Path:
        """A local folder for files being built before ``put_file`` (cheap to move into the store from there)."""

    def sweep_stale_temp(self, folder: str) -> int:
        """Removes unfinished atomic writes in a folder (not below it) whose writer process is gone (a killed step),
        leaving a live writer's alone; returns how many. Object stores have nothing to sweep: an upload that never
        completed never became an object."""
        return 0

    def sweep_stale_scratch(self) -> int:
        """Removes scratch folders of writer processes that are gone; returns how many (none outside a local root)."""
        return 0

    @abstractmethod
    def discard_scratch(self) -> None:
        """Removes this store's scratch folder and whatever is left in it (the step that used it is done)."""

    def uri_of(self, key: str) -> str:
        """The full uri of an object."""
        check_key(key)
        return f"{self.root_uri.rstrip('/')}/{key}"

    def unsafe_keys(self, keys: pa.Array) -> pa.Array:
        """For each key, whether ``uri_of`` would refuse it (vectorized; for listings of millions of keys)."""
        return pc.match_substring_regex(keys, UNSAFE_KEY_PATTERN)


class LocalStore(ObjectStore):
    """A folder on the local file system. Writes go to a hidden temp file in the same folder, then ``os.replace``."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()
        self._scratch: Path | None = None

    @property
    def root(self) -> Path:
        return self._root

    @property
    def root_uri(self) -> str:
        # Not percent-encoded: uris are identifiers shown to people and hashed into ids, like OSS keys.
        return f"file://{self._root}"

    def _path(self, key: str) -> Path:
        path = self._root.joinpath(*check_key(key))
        # Defence in depth against symlinked folders inside the root.
        if not path.resolve().is_relative_to(self._root):
            raise UnsafeKeyError(f"unsafe object key {key!r}: resolves outside {self._root}")
        return path

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
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
                        continue
                    key, bad_name = printable_name(Path(entry.path).relative_to(self._root).as_posix())
                    if key.startswith(prefix) and key > start_after:
                        found.append(self._entry_info(entry, key, "InvalidName" if bad_name else ""))
        # Sorted so listings are deterministic and a cursor (the last key seen) is meaningful.
        found.sort(key=lambda info: info.key)
        yield from found

    def _entry_info(self, entry: os.DirEntry, key: str, problem: str) -> ObjectInfo:
        """A listed entry that is not a folder: a readable file, or what keeps it from being one."""
        if not problem and entry.is_symlink():
            try:
                target = Path(entry.path).resolve()
            except (OSError, RuntimeError):  # a loop of links
                target = None
            if target is not None and not target.is_relative_to(self._root):
                problem = "OutsideRoot"  # never followed: not one of the store's objects
            elif target is None or not target.is_file():
                problem = "NotAFile"  # a link to a folder (not followed: no loops, no files listed twice) or dangling
        elif not problem and not entry.is_file(follow_symlinks=False):
            problem = "NotAFile"
        stat = entry.stat(follow_symlinks=not problem)
        return ObjectInfo(key, stat.st_size, stat.st_mtime, f"{stat.st_size}-{stat.st_mtime_ns}", problem)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with open(self._path(key), "rb") as f:
            f.seek(start)
            return f.read(max(0, end - start))

    def _temp_beside(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")

    @contextlib.contextmanager
    def _publish(self, key: str) -> Iterator[Path]:
        """Yields a hidden temporary beside ``key`` to fill; renames it into place when the block ends. Nothing is
        left on failure, and a full disk becomes ``StorageFull`` naming the key and the root."""
        path = self._path(key)
        tmp = self._temp_beside(path)
        try:
            yield tmp
            os.replace(tmp, path)
            _fsync_dir(path.parent)  # the rename itself survives a power loss only once its folder is synced
        except OSError as exc:
            if is_out_of_space(exc):
                raise self._full(key) from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._publish(key) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def put_file(self, key: str, src: Path) -> None:
        try:
            with self._publish(key) as tmp:
                # A rename when src is on the same file system, a copy otherwise; the publish is a rename either way.
                if _same_device(src, tmp.parent):
                    os.replace(src, tmp)
                    _fsync_file(tmp)  # its writer may not have synced it: the data must be on disk before the rename
                else:
                    _copy(src, tmp)
        finally:
            src.unlink(missing_ok=True)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._temp_beside(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # link() fails when the name exists, where rename() would replace it: the atomic create-if-absent.
            os.link(tmp, path)
            _fsync_dir(path.parent)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if is_out_of_space(exc):
                raise self._full(key) from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def local_path(self, key: str, max_bytes: int | None = None, version: str = "") -> Path:
        # The file itself: it always holds the current version's bytes, there is no copy to go stale.
        path = self._path(key)
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise ObjectTooLarge(f"{self.uri_of(key)} is {path.stat().st_size} bytes, over the {max_bytes}-byte limit")
        return path

    def _full(self, key: str) -> StorageFull:
        return StorageFull(
            errno.ENOSPC,
            f"no space left on the device of {self._root} while writing {key!r}; nothing half-written was published. "
            "Free space (or point ASR_OUTPUT_ROOT at a larger disk) and re-run the partition",
        )

    def sweep_stale_temp(self, folder: str) -> int:
        base = self._path(folder.strip("/")) if folder.strip("/") else self._root
        if not base.is_dir():
            return 0
        removed = 0
        for tmp in base.glob(".*.tmp"):
            host, _, rest = tmp.name.rsplit(".", 2)[-2].partition("-") if tmp.name.count(".") >= 3 else ("", "", "")
            pid = rest.split("-")[0]
            if host == _HOST and pid.isdigit() and not pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def scratch_dir(self) -> Path:
        # Inside the root so put_file is a rename; hidden, so listings never show it. Private to this store object
        # (named after its host and process, like temporaries): two runs on one shard never share a scratch file.
        if self._scratch is None:
            self._scratch = self._root / ".scratch" / f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        self._scratch.mkdir(parents=True, exist_ok=True)
        return self._scratch

    def sweep_stale_scratch(self) -> int:
        removed = 0
        for folder in (self._root / ".scratch").glob(f"{_HOST}-*-*"):
            pid = folder.name.split("-")[1]
            if folder.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    def discard_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
LOW_SPACE_BYTES = 1 << 20


class StorageFull(OSError):
    """No space left where a step writes (the output root or a scratch folder). It fails the step, never an item: the
    items are fine, the machine is not. Nothing half-written is published; re-run the partition once there is space."""


def is_out_of_space(exc: BaseException, folder: Path | None = None) -> bool:
    """Whether a write failure means the disk (or quota) is full. Some writers (libsndfile) report only a generic
    error, so with ``folder`` given, a write error while that folder's file system is (nearly) full counts too."""
    if isinstance(exc, StorageFull) or (isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE_ERRNOS):
        return True
    if folder is not None and isinstance(exc, OSError | RuntimeError):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    return False


# Names a temporary file's writer: this host (hashed: a hostname may hold dots) and process. A sweep removes only
# temporaries of this host whose process is gone; another host's (an output root on shared storage) are left alone.
def host_id(digest_size: int = 4) -> str:
    """This machine and pid namespace: two containers may share a host name (hostNetwork pods, a fixed --hostname)
    but not a pid namespace, and a pid is only meaningful within one."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.blake2b("|".join(parts).encode(), digest_size=digest_size).hexdigest()


_HOST = host_id()


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid namespace lives (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StorageAuthError(PermissionError):
    """OSS refused the credentials or the request signature; retrying cannot help."""


class StorageRefused(OSError):
    """OSS answered a request with an error that retrying cannot fix (a 4xx other than throttling or timeouts)."""

    transient = False


class ObjectTooLarge(ValueError):
    """An object larger than the caller's limit; refused before downloading it."""

    kind = "TooLarge"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter for transient storage errors.

    Attempt n (from 0) waits a random time in ``[0, min(max_delay_s, base_delay_s * 2**n)]`` before the next try.
    """

    attempts: int = 10
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0


class LocalCache:
    """A size-capped folder of downloaded objects, evicted least recently used first.

    Files are named by a hash of the object's uri and version (plus its extension when it is a plain one), so an object
    key such as ``../../etc/passwd`` or one with odd unicode can never name a path outside the cache, and an object
    replaced under the same key (a new ETag) is downloaded again instead of served from the old bytes.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path_for(self, uri: str, version: str = "") -> Path:
        raw = uri.encode("utf-8")
        # The uri's length first, so no (uri, version) pair names another's file; no version: the uri alone.
        digest = hashlib.sha256(b"%d:" % len(raw) + raw + version.encode("utf-8") if version else raw).hexdigest()
        suffix = PurePosixPath(uri).suffix.lower()
        suffix = suffix if len(suffix) <= 6 and suffix[1:].isalnum() else ""
        return self.root / digest[:2] / f"{digest}{suffix}"

    def fetch(self, uri: str, download, version: str = "") -> Path:
        """The cached file for ``uri`` at ``version``; ``download(dst)`` fills a temporary path on a miss."""
        path = self.path_for(uri, version)
        if path.is_file():
            os.utime(path)  # recently used
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            download(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        with self._lock:
            files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.root.glob("*/*") if p.is_file()]
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                if path != keep:
                    path.unlink(missing_ok=True)
                    total -= size


class OssStore(ObjectStore):
    """Objects under ``oss://bucket/prefix`` through oss2.

    Transient failures (connection errors, timeouts, 5xx, throttling) are retried with bounded exponential backoff and
    jitter; refused credentials or signatures and missing buckets fail at once with a message that names the bucket and
    endpoint, never a key. Large files are uploaded in parts and appear only when the upload completes.
    """

    MULTIPART_THRESHOLD = 64 * 1024 * 1024
    PART_SIZE = 16 * 1024 * 1024

    def __init__(self, bucket: str, prefix: str, settings: OssSettings) -> None:
        import oss2

        self._oss2 = oss2
        self._name, self._settings = bucket, settings
        self._prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._bucket = oss2.Bucket(
            oss2.Auth(settings.access_key_id, settings.access_key_secret),
            settings.endpoint,
            bucket,
            connect_timeout=30,
        )
        self._cache = LocalCache(settings.cache_dir, settings.cache_max_bytes)
        self._scratch: Path | None = None

    @property
    def root_uri(self) -> str:
        return f"oss://{self._name}/{self._prefix}".rstrip("/")

    def uri_of(self, key: str) -> str:
        return f"{self.root_uri}/{key}"

    def unsafe_keys(self, keys: pa.Array) -> pa.Array:
        # Any byte string is a legal OSS key, and the cache names files by hash: nothing is unsafe here.
        return pa.array([False] * len(keys), pa.bool_())

    def _where(self) -> str:
        return f"bucket {self._name!r} at {self._settings.endpoint}"

    def _call(self, what: str, fn):
        """Runs one OSS request with the retry policy."""
        errors = self._oss2.exceptions
        policy = self._settings.retry
        for attempt in range(policy.attempts):
            try:
                return fn()
            except errors.NoSuchKey:
                raise FileNotFoundError(f"{what}: no such object in {self._where()}") from None
            except errors.NoSuchBucket:
                raise StorageConfigError(f"{what}: {self._where()} does not exist") from None
            except errors.NotFound:  # a HEAD of a missing object: 404 without a body, so no NoSuchKey code
                raise FileNotFoundError(f"{what}: no such object in {self._where()}") from None
            except errors.OssError as exc:
                transient = exc.status in (-2, 408, 429) or exc.status >= 500 or exc.code in ("RequestTimeout",)
                if exc.status == 403 or exc.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                    raise StorageAuthError(
                        f"{what}: OSS refused the request to {self._where()} ({exc.code}); check OSS_ACCESS_KEY_ID "
                        "and OSS_ACCESS_KEY_SECRET"
                    ) from None
                if not transient:
                    raise StorageRefused(f"{what}: {self._where()} answered {exc.status} {exc.code}") from None
                if attempt + 1 == policy.attempts:
                    raise OSError(f"{what}: {self._where()} answered {exc.status} {exc.code}") from None
            time.sleep(random.uniform(0, min(policy.max_delay_s, policy.base_delay_s * 2**attempt)))
        raise AssertionError("unreachable")

    def check_bucket(self) -> None:
        """Fails fast when the bucket is missing or the credentials are refused."""
        self._call("checking the bucket", lambda: self._bucket.list_objects_v2(prefix=self._prefix, max_keys=1))

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        token = ""
        after = self._prefix + start_after if start_after else ""
        while True:
            page = self._call(
                f"listing {self.uri_of(prefix)}",
                lambda t=token: self._bucket.list_objects_v2(
                    prefix=self._prefix + prefix, continuation_token=t, start_after="" if t else after, max_keys=1000
                ),
            )
            for obj in page.object_list:
                info = ObjectInfo(obj.key[len(self._prefix) :], obj.size, float(obj.last_modified), obj.etag)
                if not obj.key.endswith("/"):
                    yield info
                elif obj.size:  # empty ones are folder placeholders, not objects
                    yield info._replace(problem="DirectoryObject")
            if not page.is_truncated:
                return
            token = page.next_continuation_token

    def exists(self, key: str) -> bool:
        return self._call(f"checking {self.uri_of(key)}", lambda: self._bucket.object_exists(self._prefix + key))

    def read_bytes(self, key: str) -> bytes:
        return self._call(f"reading {self.uri_of(key)}", lambda: self._bucket.get_object(self._prefix + key).read())

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._call(
            f"reading {self.uri_of(key)} [{start}, {end})",
            lambda: self._bucket.get_object(self._prefix + key, byte_range=(start, end - 1)).read(),
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"writing {self.uri_of(key)}", lambda: self._bucket.put_object(self._prefix + key, data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        def put() -> bool:
            try:
                self._bucket.put_object(self._prefix + key, data, headers={"x-oss-forbid-overwrite": "true"})
            except self._oss2.exceptions.OssError as exc:
                if exc.status != 409 or exc.code != "FileAlreadyExists":
                    raise
                return False
            return True

        if self._call(f"creating {self.uri_of(key)}", put):
            return True
        # Refused: someone else's object, or ours from an attempt whose answer was lost and then retried.
        return self.read_bytes(key) == data

    def put_file(self, key: str, src: Path) -> None:
        try:
            if src.stat().st_size <= self.MULTIPART_THRESHOLD:
                self.put_bytes(key, src.read_bytes())
            else:
                self._multipart(key, src)
        finally:
            src.unlink(missing_ok=True)

    def _multipart(self, key: str, src: Path) -> None:
        full, what = self._prefix + key, f"uploading {self.uri_of(key)}"
        upload_id = self._call(what, lambda: self._bucket.init_multipart_upload(full).upload_id)
        try:
            parts = []
            with open(src, "rb") as f:
                number = 1
                while chunk := f.read(self.PART_SIZE):
                    result = self._call(what, lambda n=number, c=chunk: self._bucket.upload_part(full, upload_id, n, c))
                    parts.append(self._oss2.models.PartInfo(number, result.etag))
                    number += 1
            self._call(what, lambda: self._bucket.complete_multipart_upload(full, upload_id, parts))
        except BaseException:
            # Nothing becomes visible until complete; abort so the parts are not billed forever.
            with contextlib.suppress(Exception):
                self._bucket.abort_multipart_upload(full, upload_id)
            raise

    def local_path(self, key: str, max_bytes: int | None = None, version: str = "") -> Path:
        return self._cache.fetch(self.uri_of(key), lambda dst: self._download(key, dst, max_bytes, version), version)

    def _download(self, key: str, dst: Path, max_bytes: int | None, version: str = "") -> None:
        """Downloads an object in ranged reads, checked against the size and CRC-64 its HEAD announced.

        oss2 streams a body unwrapped, so a connection dropped in the middle would fail the whole object: here the read
        resumes from the bytes already written (a Range request), a CRC-64 mismatch downloads it again, and an object
        over ``max_bytes`` is refused before any byte is fetched; never more than the announced size is written.
        """
        full, what = self._prefix + key, f"downloading {self.uri_of(key)}"
        head = self._call(what, lambda: self._bucket.head_object(full))
        size = head.content_length
        if version and head.etag != version:
            # Replaced since it was listed: the listed version no longer exists (the new one gets its own id).
            raise FileNotFoundError(f"{self.uri_of(key)} was replaced since it was listed (ETag {head.etag})")
        if max_bytes is not None and size > max_bytes:
            raise ObjectTooLarge(f"{self.uri_of(key)} is {size} bytes, over the {max_bytes}-byte limit; not downloaded")
        policy = self._settings.retry
        for attempt in range(policy.attempts):
            with open(dst, "wb") as f:
                self._read_ranges(full, what, f, size, head.etag)
            crc = _crc64_of(self._oss2, dst)
            if head.server_crc is None or crc == head.server_crc:
                return
            if attempt + 1 < policy.attempts:
                time.sleep(random.uniform(0, min(policy.max_delay_s, policy.base_delay_s * 2**attempt)))
        raise OSError(f"{what}: CRC-64 of the downloaded bytes differs from {self._where()}'s, {policy.attempts} times")

    def _read_ranges(self, full: str, what: str, f, size: int, etag: str) -> None:
        """Fills ``f`` with bytes ``[0, size)``, resuming after a dropped body; gives up after ``policy.attempts``
        drops in a row without progress."""
        policy = self._settings.retry
        stalls = 0
        while f.tell() < size:
            start = f.tell()
            result = self._call(what, lambda s=start: self._bucket.get_object(full, byte_range=(s, size - 1)))
            if result.etag != etag:
                raise OSError(f"{what}: the object was replaced during the download")
            try:
                while chunk := result.read(1 << 20):
                    if f.tell() + len(chunk) > size:
                        raise StorageRefused(f"{what}: {self._where()} sent more than the {size} bytes it announced")
                    f.write(chunk)
                if f.tell() < size:
                    raise ConnectionError(f"the body ended at byte {f.tell()} of {size}")
            except StorageRefused:
                raise
            except OSError as exc:  # requests' ChunkedEncodingError or a reset: resume from what is written
                stalls = 0 if f.tell() > start else stalls + 1
                if stalls >= policy.attempts:
                    raise OSError(f"{what}: the connection to {self._where()} keeps dropping ({exc})") from None
                time.sleep(random.uniform(0, min(policy.max_delay_s, policy.base_delay_s * 2**stalls)))
            finally:
                result.close()

    def delete(self, key: str) -> None:
        self._call(f"deleting {self.uri_of(key)}", lambda: self._bucket.delete_object(self._prefix + key))

    def scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="asr-scratch-"))
        return self._scratch

    def discard_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _crc64_of(oss2, path: Path) -> int:
    crc = oss2.utils.Crc64(0)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc.update(chunk)
    return crc.crc


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Makes a rename or link in ``path`` durable (some file systems refuse to sync a folder: nothing more to do)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


@dataclass(frozen=True)
class OssSettings:
    """How to reach OSS: endpoint and key pair (from environment variables), and the local download cache."""

    endpoint: str
    access_key_id: str
    access_key_secret: str = field(repr=False)
    cache_dir: Path = Path("./data/cache")
    cache_max_bytes: int = 50 * 1024**3
    retry: RetryPolicy = RetryPolicy()


def open_store(uri: str, *, must_exist: bool, what: str, oss: OssSettings | None = None) -> ObjectStore:
    """Builds the store for a uri: ``oss://bucket/prefix``, ``file:///abs``, ``file://rel``, or a plain path.

    Args:
        uri: where the store lives.
        must_exist: fail when the folder (or bucket) does not exist (sources); otherwise create the folder (outputs).
        what: the setting's name, for error messages (``ASR_SOURCE_URI``).
        oss: OSS endpoint and credentials, needed for ``oss://`` uris.
    """
    if not uri:
        raise StorageConfigError(f"{what} is empty: set it to a folder, a file:// or an oss:// uri")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.netloc + parsed.path) if parsed.scheme == "file" else uri).expanduser()
        if must_exist and not path.is_dir():
            raise StorageConfigError(f"{what}={uri!r}: folder {path.resolve()} does not exist")
        path.mkdir(parents=True, exist_ok=True)
        return LocalStore(path)
    if parsed.scheme == "oss":
        if not parsed.netloc:
            raise StorageConfigError(f"{what}={uri!r}: expected oss://bucket/prefix")
        if oss is None or not oss.endpoint or not oss.access_key_id or not oss.access_key_secret:
            raise StorageConfigError(
                f"{what}={uri!r} needs OSS_ENDPOINT, OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET to be set"
            )
        store = OssStore(parsed.netloc, parsed.path.lstrip("/"), oss)
        store.check_bucket()
        return store
    raise StorageConfigError(f"{what}={uri!r}: unsupported scheme {parsed.scheme!r} (use a folder, file:// or oss://)")


def read_table(store: ObjectStore, key: str, schema: pa.Schema) -> pa.Table:
    """Reads a Parquet object as ``schema`` (an empty table when it does not exist yet)."""
    if not store.exists(key):
        return schema.empty_table()
    table = pq.read_table(io.BytesIO(store.read_bytes(key)))
    # Tables written by an earlier version may lack columns added since: nullable ones read as nulls.
    for column in schema:
        if column.name not in table.column_names:
            if not column.nullable:
                raise ValueError(f"{store.uri_of(key)}: column {column.name!r} is missing and cannot be null")
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(schema.names).cast(schema)


def write_table(store: ObjectStore, key: str, table: pa.Table) -> None:
    """Writes a Parquet object atomically (zstd, deterministic bytes for the same table)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put_bytes(key, buf.getvalue())


class StorageResource(dg.ConfigurableResource):
    """Where media comes from and where every output goes: local folders or OSS (``oss://bucket/prefix``)."""

    source_uri: str = Field(
        description="Media to list recursively: a folder, file:// or oss:// uri. Env: ASR_SOURCE_URI."
    )
    output_root: str = Field(
        default="./data/out",
        description="Where all outputs live: a folder, file:// or oss:// uri. Env: ASR_OUTPUT_ROOT.",
    )
    oss_endpoint: str = Field(
        default="", description="OSS endpoint, e.g. https://oss-cn-hangzhou.aliyuncs.com. Env: OSS_ENDPOINT."
    )
    oss_access_key_id: str = Field(default="", description="Env: OSS_ACCESS_KEY_ID.")
    oss_access_key_secret: str = Field(default="", description="Env: OSS_ACCESS_KEY_SECRET. Never logged.")
    cache_dir: str = Field(default="./data/cache", description="Local cache for objects downloaded from OSS.")
    cache_max_gb: float = Field(default=50.0, description="The cache evicts least recently used files beyond this.")

    def _oss(self) -> OssSettings:
        return OssSettings(
            endpoint=self.oss_endpoint,
            access_key_id=self.oss_access_key_id,
            access_key_secret=self.oss_access_key_secret,
            cache_dir=Path(self.cache_dir),
            cache_max_bytes=int(self.cache_max_gb * 1024**3),
        )

    def source(self) -> ObjectStore:
        """The media source; fails fast when it does not exist or refuses the credentials."""
        return open_store(self.source_uri, must_exist=True, what="ASR_SOURCE_URI", oss=self._oss())

    def output(self) -> ObjectStore:
        """The output root; created when missing (a local folder)."""
        return open_store(self.output_root, must_exist=False, what="ASR_OUTPUT_ROOT", oss=self._oss())

    def store_at(self, uri: str, what: str) -> ObjectStore:
        """Another existing folder or OSS prefix (an evaluation set), with the same credentials."""
        return open_store(uri, must_exist=True, what=what, oss=self._oss())
