"""vad_segments: Silero VAD over each decoded file in worker processes; segments and a per-file VAD outcome."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from asr_assets import failures, layout
from asr_assets.failures import BugGuard, RetryBudget, TransientFailure
from asr_assets.pool import PoolOutcome, run_pool
from asr_assets.records import (
    AUDIO_SCHEMA,
    SEGMENT_SCHEMA,
    VAD_MEDIA_SCHEMA,
    DeadLetterRow,
    VadMediaRow,
    to_table,
)
from asr_assets.stages.common import PoolSettings, StageReport, dead_letter_state, error_of, ids_of
from asr_assets.vad import VadItem, VadJob, VadParams, detect_speech, model_sha256
from resources.storage import (
    ObjectStore,
    read_table,
    write_table,
)


@dataclass(frozen=True)
class GroupSettings:
    """Small files are grouped into one worker job (fewer round trips); a group holds at most ``max_items`` files and
    ``max_audio_s`` seconds of audio (bounding a job's time); a longer file forms a group of its own."""

    max_items: int = 8
    max_audio_s: float = 1800.0


def _groups(rows: list[dict], settings: GroupSettings) -> Iterator[list[dict]]:
    group: list[dict] = []
    audio_s = 0.0
    for row in rows:
        duration = row["duration_s"] or 0.0
        if group and (len(group) >= settings.max_items or audio_s + duration > settings.max_audio_s):
            yield group
            group, audio_s = [], 0.0
        group.append(row)
        audio_s += duration
    if group:
        yield group


def vad_shard(
    out: ObjectStore,
    shard: str,
    params: VadParams,
    model_path: Path,
    pool: PoolSettings,
    grouping: GroupSettings | None = None,
    budget: RetryBudget | None = None,
) -> StageReport:
    """Runs Silero VAD on every decoded media object without a VAD outcome and appends its segments.

    When a whole group fails (a worker timed out or died), its files are run again one per job, so only the file that
    caused it is dead-lettered, and only after its third attempt. A file whose audio could not be read
    (UnreadableAudio, transient) is retried within ``budget``; then the step fails and it stays pending.
    """
    started = time.perf_counter()
    budget = budget or RetryBudget()
    report = StageReport()
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    decoded = audio.filter(pc.equal(audio["status"], "decoded"))
    media = read_table(out, layout.vad_media_key(shard), VAD_MEDIA_SCHEMA)
    guard = BugGuard("vad_segments", shard, fresh=media.num_rows == 0)
    segments = read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA)
    # Segments are written before the media outcomes that vouch for them: segments of media without an outcome are
    # left over from a crash between the two writes, and their media runs again.
    segments = segments.filter(pc.is_in(segments["media_id"], value_set=media["media_id"]))
    segmented = ids_of(media, "media_id")
    letters = dead_letter_state(out, "vad_segments", shard, segmented)
    retried, attempts = letters.retried, letters.attempts
    done = segmented | letters.final
    columns = ["media_id", "uri", "audio_key", "duration_s"]
    todo = [r for r in decoded.select(columns).to_pylist() if r["media_id"] not in done]
    uris = {r["media_id"]: r["uri"] for r in todo}
    keys = {r["media_id"]: r["audio_key"] for r in todo}

    def refetched(item: VadItem) -> VadItem:
        """The item with a fresh local copy (an OSS output root's cache may have lost it); as it was when the store
        cannot give one now (the next round tries again)."""
        try:
            return VadItem(item.media_id, out.local_path(keys[item.media_id]))
        except OSError:
            return item

    def job(rows: list[dict]) -> VadJob:
        items = tuple(VadItem(r["media_id"], out.local_path(r["audio_key"])) for r in rows)
        return VadJob(items, params, model_path)

    media_rows: list[VadMediaRow] = []
    segment_rows: list = []
    dead: list[DeadLetterRow] = []

    def flush(final_flush: bool = False) -> None:
        nonlocal media, segments
        if (media_rows or dead) and guard.may_flush(final_flush):
            ok_ids = {r.media_id for r in media_rows}
            segments = pa.concat_tables([segments, to_table(segment_rows, SEGMENT_SCHEMA)])
            media = pa.concat_tables([media, to_table(media_rows, VAD_MEDIA_SCHEMA)])
            layout.append_dead_letters(out, "vad_segments", shard, dead)
            write_table(out, layout.segments_key(shard), segments)  # segments before the media outcomes that vouch
            write_table(out, layout.vad_media_key(shard), media)
            layout.remove_dead_letters(out, "vad_segments", shard, ok_ids & retried)  # after the outcome replacing it
            media_rows.clear()
            segment_rows.clear()
            dead.clear()

    def fail(media_id: str, kind: str, message: str, unexpected: bool = False) -> None:
        attempt = attempts.get(media_id, 0) + (failures.classify(kind) != failures.SUSPECT)
        dead.append(layout.dead_letter(media_id, uris[media_id], "vad_segments", kind, message, max(attempt, 1)))
        guard.failed(kind, message, unexpected, media_id)
        report.fail(kind)

    def record(outcome: PoolOutcome, retry: list[VadJob], unreadable: list[VadItem]) -> None:
        batch: VadJob = outcome.job
        if outcome.result is None:
            if len(batch.items) > 1:
                retry.extend(VadJob((item,), params, model_path) for item in batch.items)
                return
            kind, message = error_of(outcome)
            media_id = batch.items[0].media_id
            if failures.classify(kind) == failures.SUSPECT:
                attempts[media_id] = attempts.get(media_id, 0) + 1
                if attempts[media_id] < failures.MAX_ATTEMPTS:
                    retry.append(batch)
                    return
            message = f"vad_segments: media {media_id} ({uris[media_id]}): {message}"
            fail(media_id, kind, message, failures.is_unexpected(outcome.error))
            return
        for item, result in zip(batch.items, outcome.result, strict=True):
            if result.error_class is not None and failures.classify(result.error_class) == failures.TRANSIENT:
                unreadable.append(item)
                last_error[0] = result.error
                continue
            if result.error_class is not None:
                fail(result.media_id, result.error_class, result.error)
                continue
            guard.ok()
            speech_s = sum(s.end_s - s.start_s for s in result.segments)
            media_rows.append(VadMediaRow(result.media_id, result.duration_s, speech_s, len(result.segments)))
            segment_rows.extend(result.segments)
            report.ok(result.duration_s)

    jobs: Iterable[VadJob] = (job(rows) for rows in _groups(todo, grouping or GroupSettings()))
    last_error = [""]
    unreadable_since: float | None = None
    rounds = 0
    while True:
        retry: list[VadJob] = []
        unreadable: list[VadItem] = []
        for outcome in run_pool(
            detect_speech,
            jobs,
            workers=pool.workers,
            timeout_s=pool.timeout_s,
            memory_limit_bytes=pool.memory_limit_bytes,
        ):
            record(outcome, retry, unreadable)
            if len(media_rows) + len(dead) >= pool.checkpoint_every:
                flush()
        if unreadable:
            unreadable_since = unreadable_since or time.monotonic()
            if time.monotonic() - unreadable_since > budget.deadline_s:
                flush(final_flush=True)
                raise TransientFailure("vad_segments", shard, len(unreadable), last_error[0])
            time.sleep(budget.delay(rounds))
            rounds += 1
            retry.extend(VadJob((refetched(item),), params, model_path) for item in unreadable)
        if not retry:
            break
        jobs = retry
    flush(final_flush=True)
    if report.processed:
        report.outputs += [layout.segments_key(shard), layout.vad_media_key(shard)]
    report.totals = {
        "media": media.num_rows,
        "segments": segments.num_rows,
        "speech_hours": (pc.sum(media["speech_s"]).as_py() or 0.0) / 3600,
        "audio_hours": (pc.sum(media["duration_s"]).as_py() or 0.0) / 3600,
        "vad_model_sha256": model_sha256(model_path),
    }
    report.seconds = time.perf_counter() - started
    return report
