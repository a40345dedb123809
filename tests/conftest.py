"""Shared fixtures: a generated sample corpus and a pipeline run over it, made once per test session."""

from __future__ import annotations

import os

# No test may reach a model or data hub: Hugging Face libraries fail fast instead of trying.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The second opinion (Whisper base on every segment) more than doubles the teacher's time. Dagster processes the
# tests start (CLI, webserver, daemon) run without it; the in-process runs opt in where a test is about it
# (``pipeline_run``, the second-opinion and real-speech filter tests).
os.environ.setdefault("ASR_SECOND_OPINION", "off")
# The sample corpus is English espeak-ng speech, which Whisper base's language ID misreads now and then (espeak's voices
# are far from human speech: bench/RESULTS.md "Language ID"); the tests that judge English labels say so, as a user
# with an English collection would. Language ID itself is tested on real speech and several languages (test_lid.py).
os.environ.setdefault("ASR_LANGUAGE", "en")

import dataclasses  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import dagster as dg  # noqa: E402
import pytest  # noqa: E402

from asr_assets.definitions import all_assets, all_checks  # noqa: E402
from asr_assets.sample_corpus import FORMATS, Corpus, _plan_files, generate_corpus  # noqa: E402
from partitions import NUM_SHARDS, shard_of  # noqa: E402
from resources.storage import LocalStore, StorageResource  # noqa: E402
from resources.teachers import DEFAULT_SECOND_OPINION, TeacherResource  # noqa: E402

# Seven good files cover every format exactly once; the four broken files come on top.
NUM_FILES = len(FORMATS)


def _busiest(corpus: Corpus) -> tuple[str, int, int]:
    """The shard with the most files, and how many good and broken files it holds."""
    shards = [shard_of(uri_of(corpus, item.path), NUM_SHARDS) for item in corpus.items]
    shard = Counter(shards).most_common(1)[0][0]
    mine = [item for s, item in zip(shards, corpus.items, strict=True) if s == shard]
    return shard, sum(1 for item in mine if not item.broken), sum(1 for item in mine if item.broken)


def _teacher_seconds(corpus: Corpus, shard: str) -> float:
    """A lower bound on the seconds the teacher packs into windows for a shard of the corpus: each sentence's speech
    plus the 1 s gap after it in a window, leaving out every sentence that another good file says in the same voice
    (the dedup index may skip it as a copy). Over 30 s, the shard needs at least two teacher windows."""
    voices = {plan.rel_path: plan.voice for plan in _plan_files(0, NUM_FILES)}
    good = [item for item in corpus.items if not item.broken]
    said = Counter((voices[item.path], sentence) for item in good for sentence in item.sentences)
    return sum(
        end - start + 1.0
        for item in good
        if shard_of(uri_of(corpus, item.path), NUM_SHARDS) == shard
        for (start, end), sentence in zip(item.speech, item.sentences, strict=True)
        if said[(voices[item.path], sentence)] == 1
    )


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The sample corpus, in a folder whose busiest shard holds good and broken files alike, and speech for more than
    one teacher window.

    A file's shard is a hash of its absolute uri, so where pytest puts its temporary folder decides which shard gets
    which file. The folder is renamed (not regenerated) until one partition exercises both the good and the broken
    paths and labels its segments in at least two windows (a kill can then land between two of them:
    test_fault_drills); the choice depends only on the folder's path, so a given machine always picks the same one.
    """
    base = tmp_path_factory.mktemp("corpora")
    corpus = generate_corpus(base / "corpus-0", seed=0, num_files=NUM_FILES)
    for attempt in range(1, 257):
        shard, good, broken = _busiest(corpus)
        if good >= 2 and broken >= 1 and _teacher_seconds(corpus, shard) > 32.0:
            return corpus
        moved = base / f"corpus-{attempt}"
        corpus.media_dir.parent.rename(moved)
        corpus = dataclasses.replace(
            corpus, media_dir=moved / corpus.media_dir.name, references_path=moved / corpus.references_path.name
        )
    raise RuntimeError(
        f"no folder under {base} gives a shard with good and broken sample files and two teacher windows of speech"
    )


def uri_of(corpus: Corpus, path: str) -> str:
    return LocalStore(corpus.media_dir).uri_of(path)


@pytest.fixture(scope="session")
def busiest_shard(corpus: Corpus) -> str:
    """The shard holding the most sample files (good and broken), so one partition exercises the most paths."""
    return _busiest(corpus)[0]


def resources_for(corpus: Corpus, output_root: Path, second_opinion: bool = False) -> dict:
    teacher = TeacherResource(language="en", second_opinion=DEFAULT_SECOND_OPINION if second_opinion else "off")
    return {
        "storage": StorageResource(source_uri=str(corpus.media_dir), output_root=str(output_root)),
        "teacher": teacher,
    }


def materialize_shard(
    corpus: Corpus,
    output_root: Path,
    shard: str,
    run_config: dict | None = None,
    raise_on_error: bool = True,
    second_opinion: bool = False,
):
    """Runs every partitioned asset and check of the graph on one shard, in process, and returns the result."""
    per_shard = [a for a in all_assets if a.partitions_def is not None]
    return dg.materialize(
        [*per_shard, *all_checks],
        resources=resources_for(corpus, output_root, second_opinion),
        partition_key=shard,
        run_config=run_config or {},
        raise_on_error=raise_on_error,
    )


@pytest.fixture(scope="session")
def pipeline_run(corpus: Corpus, busiest_shard: str, tmp_path_factory: pytest.TempPathFactory):
    """The whole graph materialized once on the busiest shard: (result, output root, shard)."""
    out = tmp_path_factory.mktemp("out")
    # With every signal on: a second opinion and a DNSMOS score for every segment.
    config = {"ops": {"segment_features": {"config": {"dnsmos_fraction": 1.0}}}}
    return materialize_shard(corpus, out, busiest_shard, config, second_opinion=True), out, busiest_shard
