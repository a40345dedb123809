"""The failure taxonomy in the stages: transient failures retried and never final, suspect ones up to three attempts,
old pending dead letters retried (their rows removed on success), and a code bug failing the step."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from asr_assets import failures, layout
from asr_assets.checks import reconcile_audio
from asr_assets.failures import RetryBudget, StageBroken, TransientFailure
from asr_assets.records import AUDIO_SCHEMA, FEATURE_SCHEMA
from asr_assets.sample_corpus import Corpus
from asr_assets.stages import DecodeSettings, PoolSettings, TranscribeSettings, decode_shard, transcribe_shard
from resources.storage import LocalStore, read_table, write_table
from resources.teachers.base import TeacherEngine, TeacherOutput, TeacherSettings

POOL = PoolSettings(workers=2, timeout_s=120)
SETTINGS = DecodeSettings(1 << 30, 3600.0)
QUICK = RetryBudget(deadline_s=30.0, base_delay_s=0.001, max_delay_s=0.01)


def test_every_kind_has_one_class() -> None:
    assert failures.classify("FetchError") == failures.TRANSIENT == failures.classify("UnreadableAudio")
    assert failures.classify("Timeout") == failures.SUSPECT == failures.classify("EngineCallFailed")
    # MediaError kinds and kinds nobody named (a new input kind) are permanent: dead-lettered, never retried.
    assert failures.classify("DecodeError") == failures.PERMANENT == failures.classify("IdCollision")
    assert failures.is_final("DecodeError", 1) and failures.is_final("Timeout", 3)
    assert not failures.is_final("Timeout", 2) and not failures.is_final("FetchError", 99)


class _Flaky(LocalStore):
    """A source whose fetches fail like a dropped connection ``failures`` times, then work."""

    def __init__(self, root: Path, failures: int) -> None:
        super().__init__(root)
        self.left, self.calls = failures, 0

    def local_path(self, key: str, max_bytes: int | None = None, version: str = "") -> Path:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise ConnectionResetError("connection reset by peer")
        return super().local_path(key, max_bytes, version)


def _pending(pipeline_run, tmp_path: Path, count: int) -> tuple[LocalStore, str, list[str]]:
    """A copy of the pipeline's output where ``count`` decoded media have no audio_wav outcome yet."""
    _, out, shard = pipeline_run
    shutil.copytree(out, tmp_path / "out")
    store = LocalStore(tmp_path / "out")
    manifest = read_table(store, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    decoded = manifest.filter(pc.equal(manifest["status"], "decoded"))["media_id"].to_pylist()[:count]
    assert len(decoded) == count
    kept = manifest.filter(pc.invert(pc.is_in(manifest["media_id"], value_set=_arr(decoded))))
    write_table(store, layout.audio_manifest_key(shard), kept)
    return store, shard, decoded


def _arr(ids: list[str]) -> pa.Array:
    return pa.array(ids, pa.string())


def _dead(store: LocalStore, stage: str, shard: str) -> list[dict]:
    return layout.read_dead_letters(store, stage, shard).to_pylist()


def test_a_transient_fetch_failure_is_retried_within_the_run(pipeline_run, corpus: Corpus, tmp_path: Path) -> None:
    store, shard, (victim,) = _pending(pipeline_run, tmp_path, 1)
    dead_before = _dead(store, "audio_wav", shard)
    source = _Flaky(corpus.media_dir, failures=3)
    report = decode_shard(source, store, shard, SETTINGS, POOL, budget=QUICK)
    assert (report.processed, report.succeeded, source.calls) == (1, 1, 4)
    assert _dead(store, "audio_wav", shard) == dead_before
    assert reconcile_audio(store, shard).passed


def test_past_the_deadline_the_step_fails_and_nothing_is_dead_lettered(
    pipeline_run, corpus: Corpus, tmp_path: Path
) -> None:
    store, shard, victims = _pending(pipeline_run, tmp_path, 2)
    dead_before = _dead(store, "audio_wav", shard)
    manifest_before = read_table(store, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    source = _Flaky(corpus.media_dir, failures=10**9)
    with pytest.raises(TransientFailure, match=r"audio_wav on .*: 2 item\(s\) stay pending.*ConnectionResetError"):
        decode_shard(source, store, shard, SETTINGS, POOL, budget=RetryBudget(0.05, 0.001, 0.01))
    assert source.calls > 1 and _dead(store, "audio_wav", shard) == dead_before
    assert read_table(store, layout.audio_manifest_key(shard), AUDIO_SCHEMA).equals(manifest_before)
    # The next run, with the store back, completes them.
    report = decode_shard(LocalStore(corpus.media_dir), store, shard, SETTINGS, POOL)
    assert report.succeeded == 2 and reconcile_audio(store, shard).passed


class _Stalls(LocalStore):
    """A source whose objects are FIFOs nobody writes to: decoding one blocks until its worker is killed."""

    def local_path(self, key: str, max_bytes: int | None = None, version: str = "") -> Path:
        fifo = self.root / "stall.fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        return fifo


def test_a_worker_timeout_is_retried_alone_then_dead_lettered_with_three_attempts(
    pipeline_run, corpus: Corpus, tmp_path: Path
) -> None:
    store, shard, (victim,) = _pending(pipeline_run, tmp_path, 1)
    (tmp_path / "src").mkdir()
    report = decode_shard(_Stalls(tmp_path / "src"), store, shard, SETTINGS, PoolSettings(1, timeout_s=1.0))
    assert report.failed == 1 and report.errors["Timeout"] == 1
    row = next(r for r in _dead(store, "audio_wav", shard) if r["item_id"] == victim)
    assert (row["error_class"], row["attempt"]) == ("Timeout", 3)
    # Final now: the next run leaves it alone.
    assert decode_shard(LocalStore(corpus.media_dir), store, shard, SETTINGS, POOL).processed == 0


def test_old_pending_dead_letters_are_retried_and_their_rows_removed(
    pipeline_run, corpus: Corpus, tmp_path: Path
) -> None:
    store, shard, (fetch_failed, timed_out) = _pending(pipeline_run, tmp_path, 2)
    # What an older version left: a fetch failure and one timeout, each dead-lettered as final with attempt 1.
    layout.append_dead_letters(
        store,
        "audio_wav",
        shard,
        [
            layout.dead_letter(fetch_failed, "u", "audio_wav", "FetchError", "connection refused"),
            layout.dead_letter(timed_out, "u", "audio_wav", "Timeout", "no result within 600 s"),
        ],
    )
    report = decode_shard(LocalStore(corpus.media_dir), store, shard, SETTINGS, POOL)
    assert (report.processed, report.succeeded) == (2, 2)
    assert not {fetch_failed, timed_out} & {r["item_id"] for r in _dead(store, "audio_wav", shard)}
    manifest = read_table(store, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    assert manifest["media_id"].to_pylist().count(fetch_failed) == 1  # exactly one outcome per item
    assert reconcile_audio(store, shard).passed


def test_a_bug_that_fails_every_item_the_same_way_fails_the_step(pipeline_run, corpus: Corpus, tmp_path: Path) -> None:
    store, shard, _ = _pending(pipeline_run, tmp_path, 2)
    dead_before = _dead(store, "audio_wav", shard)
    broken = DecodeSettings(1 << 30, None)  # type: ignore[arg-type]  # a code bug: TypeError in every worker
    with pytest.raises(StageBroken, match="every one of 2 items failed with the same unexpected error TypeError"):
        decode_shard(LocalStore(corpus.media_dir), store, shard, broken, POOL)
    assert _dead(store, "audio_wav", shard) == dead_before  # nothing dead-lettered: the items stay pending
    assert decode_shard(LocalStore(corpus.media_dir), store, shard, SETTINGS, POOL).succeeded == 2


class _FailsOn(TeacherEngine):
    """Labels every segment except ``bad``, on which it raises (even alone)."""

    name = "fails-on-one"
    prompt_version = "test"
    model_id = "none"
    bad = ""

    def transcribe(self, batch):
        if any(item.segment_id == self.bad for item in batch):
            raise RuntimeError("engine crashed")
        return [TeacherOutput("x", "en", 1, -0.1, None, None, "stop") for _ in batch]


def test_a_segment_the_engine_fails_on_is_retried_across_runs_until_its_third_attempt(
    pipeline_run, tmp_path: Path
) -> None:
    _, out, shard = pipeline_run
    shutil.copytree(out, tmp_path / "out")
    store = LocalStore(tmp_path / "out")
    for info in list(store.list(layout.transcripts_prefix(shard))):
        store.delete(info.key)
    store.delete(layout.dead_letter_key("transcripts", shard))
    featured = read_table(store, layout.features_key(shard), FEATURE_SCHEMA)
    engine = _FailsOn(TeacherSettings())
    engine.bad = featured["segment_id"][0].as_py()
    attempts = []
    for _ in range(4):
        report = transcribe_shard(store, shard, lambda: engine, TranscribeSettings(batch_size=4))
        attempts.append([(r["error_class"], r["attempt"]) for r in _dead(store, "transcripts", shard)])
        if attempts[-1][0][1] < 3:
            assert report.failed == 1
    assert attempts == [[("EngineCallFailed", n)] for n in (1, 2, 3, 3)]
    assert report.processed == 0  # the third failure was final


def test_a_damaged_local_part_fails_transcripts_at_once_naming_it(pipeline_run, tmp_path: Path) -> None:
    # Not a storage outage: a packed part on a local disk that no longer decodes cannot get better by waiting, and the
    # segments are fine (only our copy is not), so the step fails at once and nothing is dead-lettered.
    _, out, shard = pipeline_run
    shutil.copytree(out, tmp_path / "out")
    store = LocalStore(tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / "transcripts" / shard)
    part = read_table(store, layout.features_key(shard), FEATURE_SCHEMA)["audio_key"][0].as_py()
    (tmp_path / "out" / part).write_bytes(b"fLaC" + os.urandom(4096))
    patient = RetryBudget(deadline_s=3600.0, base_delay_s=60.0, max_delay_s=60.0)  # would wait, were it retried
    with pytest.raises(RuntimeError, match=rf"the packed part .*{part}.* is damaged"):
        transcribe_shard(store, shard, lambda: None, TranscribeSettings(), budget=patient)
    assert _dead(store, "transcripts", shard) == []


def test_the_bug_guard_counts_a_suspect_kind_by_item_and_only_on_a_fresh_shard() -> None:
    # One long file whose 12 segments all time out is one hostile file: dead-lettered as usual, not a broken stage.
    guard = failures.BugGuard("segment_features", "shard-00000", fresh=True)
    for _ in range(12):
        guard.failed("Timeout", "no result", False, "media-1")
    assert guard.may_flush(final=True)
    # Five files failing the same suspect way, nothing else, on a shard where the stage never succeeded: a cap set too
    # low (or a broken machine), not five bad files: the step fails and nothing is dead-lettered.
    guard = failures.BugGuard("audio_wav", "shard-00000", fresh=True)
    for n in range(5):
        guard.failed("MemoryLimit", "over the cap", False, f"media-{n}")
    assert not guard.may_flush()
    with pytest.raises(StageBroken, match="5 items failed with the same unexpected error MemoryLimit"):
        guard.may_flush(final=True)
    # The same on a shard with earlier successes: more likely a batch of hostile files; they are dead-lettered.
    guard = failures.BugGuard("audio_wav", "shard-00000", fresh=False)
    for n in range(5):
        guard.failed("MemoryLimit", "over the cap", False, f"media-{n}")
    assert guard.may_flush(final=True)
