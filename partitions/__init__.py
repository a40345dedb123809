"""The one partitioning of the dataset: static index shards.

A media object's shard is a stable hash of its uri modulo the shard count, so new arrivals land in existing shards and
the partition set never changes. The count is fixed per dataset (``ASR_NUM_SHARDS``, default 4); changing it for an
existing output root would move objects between shards, so the assets refuse to run when the recorded count differs.
"""

from __future__ import annotations

import hashlib
import os

import dagster as dg

DEFAULT_NUM_SHARDS = 4
# Dagster handles about 100k partitions per asset; far fewer keep the UI and backfills responsive.
MAX_NUM_SHARDS = 50_000


def num_shards_from_env() -> int:
    """Reads ``ASR_NUM_SHARDS``; fails with a clear message when it is not a usable count."""
    raw = os.environ.get("ASR_NUM_SHARDS", str(DEFAULT_NUM_SHARDS))
    try:
        count = int(raw)
    except ValueError:
        raise ValueError(f"ASR_NUM_SHARDS must be an integer, got {raw!r}") from None
    if not 1 <= count <= MAX_NUM_SHARDS:
        raise ValueError(f"ASR_NUM_SHARDS must be between 1 and {MAX_NUM_SHARDS}, got {count}")
    return count


def partitions_per_gpu_run_from_env() -> int:
    """Reads ``ASR_PARTITIONS_PER_GPU_RUN``: how many shards a backfill gives one teacher run (default 4)."""
    raw = os.environ.get("ASR_PARTITIONS_PER_GPU_RUN", "4")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"ASR_PARTITIONS_PER_GPU_RUN must be a positive integer, got {raw!r}")
    return int(raw)


def shard_key(index: int) -> str:
    """The partition key of shard ``index``: ``shard-00000``."""
    return f"shard-{index:05d}"


def shard_index(key: str) -> int:
    """Inverse of :func:`shard_key`."""
    prefix, _, digits = key.partition("-")
    if prefix != "shard" or not digits.isdigit():
        raise ValueError(f"not a shard partition key: {key!r}")
    return int(digits)


def uri_digest(uri: str) -> bytes:
    """8 bytes of blake2b over the uri: the shard is its value modulo the shard count (every version of a uri lands in
    the same shard)."""
    return hashlib.blake2b(uri.encode("utf-8"), digest_size=8).digest()


# Recorded in the output root's dataset.json: an output root built with another scheme is refused.
MEDIA_ID_SCHEME = "blake2b-128(uri,version)"


def media_id_bytes(uri: bytes, version: bytes) -> str:
    """:func:`media_id` over already-encoded parts (the index hashes millions of uris and encodes them once)."""
    # The uri's length first: no (uri, version) pair can be spelled as another one.
    return hashlib.blake2b(b"%d:" % len(uri) + uri + version, digest_size=16).hexdigest()


def media_id(uri: str, version: str) -> str:
    """A media object's id: 32 hex chars (128 bits) of blake2b over its uri and its version.

    The version (size and mtime of a local file, the ETag of an OSS object, "" when a manifest names neither) is part
    of the identity: an object replaced under the same uri gets a new id, is processed again, and retires the old one.
    128 bits make an accidental collision negligible even over billions of objects; the index still dead-letters one
    (``IdCollision``) rather than trusting that.
    """
    return media_id_bytes(uri.encode("utf-8"), version.encode("utf-8"))


def shard_of(uri: str, num_shards: int) -> str:
    """The shard a media uri belongs to: blake2b of the uri, modulo the shard count. Stable across runs and machines."""
    return shard_key(int.from_bytes(uri_digest(uri), "big") % num_shards)


NUM_SHARDS = num_shards_from_env()
PARTITIONS_PER_GPU_RUN = partitions_per_gpu_run_from_env()

shard_partitions = dg.StaticPartitionsDefinition([shard_key(i) for i in range(NUM_SHARDS)])
