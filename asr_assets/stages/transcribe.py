"""transcripts: the teacher (and the sampled second opinion) labels every featured segment, wave by wave."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from asr_assets import dedup, layout
from asr_assets.failures import RetryBudget, TransientFailure
from asr_assets.media import PartReader
from asr_assets.records import (
    FEATURE_SCHEMA,
    SAMPLE_RATE,
    TRANSCRIPT_SCHEMA,
    DeadLetterRow,
    TranscriptRow,
    to_table,
)
from asr_assets.second_opinion import SecondOpinion, SecondOpinionStats, disagreement, is_sampled
from asr_assets.stages.common import StageReport, dead_letter_state, ids_of
from resources.storage import (
    ObjectStore,
    StorageAuthError,
    is_out_of_space,
    read_table,
    write_table,
)
from resources.teachers.base import (
    EngineCallFailed,
    TeacherBroken,
    TeacherEngine,
    TeacherError,
    TeacherInput,
    TeacherOutput,
    pack_windows,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TranscribeSettings:
    """Feeding the teacher: segments are read in waves (bounded host memory), sorted by duration within a wave, and
    each wave's results are written as one Parquet part (the resume checkpoint)."""

    wave_size: int = 256
    batch_size: int = 16
    language: str = "en"
    min_language_prob: float = 0.5


def read_transcripts(out: ObjectStore, shard: str) -> pa.Table:
    """Every transcript part of a shard, concatenated."""
    tables = [read_table(out, info.key, TRANSCRIPT_SCHEMA) for info in out.list(layout.transcripts_prefix(shard))]
    return pa.concat_tables(tables) if tables else TRANSCRIPT_SCHEMA.empty_table()


def transcribe_shard(
    out: ObjectStore,
    shard: str,
    engine: Callable[[], TeacherEngine],
    settings: TranscribeSettings,
    on_wave: Callable[[StageReport], None] | None = None,
    second: SecondOpinion | None = None,
    budget: RetryBudget | None = None,
    lid: Callable[[], Any] | None = None,
) -> StageReport:
    """Labels every featured segment without a transcript or final dead letter, writing one part per wave.

    A segment whose audio cannot be read (a store outage) is retried within ``budget``, then the step fails with
    :class:`TransientFailure` and the segment stays pending; a segment the engine fails on alone (EngineCallFailed) is
    dead-lettered but retried by the next runs until its third attempt.

    With ``second``, an independent engine also labels the sampled segments of each batch the teacher labelled; its
    text and disagreement go into the same rows (so into the same checkpoint part). A segment the second engine fails
    on keeps the teacher's label with null second-opinion columns.

    Args:
        out: output store.
        shard: partition key.
        engine: returns the loaded teacher (called only when there is work, so a no-op run loads nothing).
        settings: wave and batch sizes.
        on_wave: called after each wave is written (progress logging).
        second: the second opinion, if any (its engine is loaded only when a sampled segment has a label).
        budget: how long a failed audio read is retried (default: ``ASR_TRANSIENT_DEADLINE_S``).
        lid: returns the spoken language ID (``asr_assets.lid.SpokenLanguageId``), called on first use; required
            when ``settings.language`` is ``auto``: each segment's language is detected before the teacher sees it,
            and a detection less probable than ``settings.min_language_prob`` leaves the language to the teacher.
    """
    started = time.perf_counter()
    budget = budget or RetryBudget()
    report = StageReport()
    features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA)
    existing = read_transcripts(out, shard)
    labelled = ids_of(existing, "segment_id")
    letters = dead_letter_state(out, "transcripts", shard, labelled)
    retried, attempts = letters.retried, letters.attempts
    done = labelled | letters.final
    todo = features.filter(pc.invert(pc.is_in(features["segment_id"], value_set=pa.array(sorted(done), pa.string()))))
    # Storage order: each packed part is read front to back.
    todo = todo.sort_by([("audio_key", "ascending"), ("audio_offset", "ascending")]).to_pylist()
    todo = _skip_known_copies(out, shard, todo, report, retried)
    index = layout.read_index(out, shard)
    uris = dict(zip(index["media_id"].to_pylist(), index["uri"].to_pylist(), strict=True))
    teacher = engine() if todo else None
    window_of = window_keys(features, teacher.window_s) if teacher is not None else {}
    second_engine: TeacherEngine | None = None
    lid_engine = None
    stats = SecondOpinionStats()
    reader = PartReader()
    try:
        for wave in _waves(_group(todo, window_of), settings.wave_size):
            # Similar lengths batch together (one segment per window unless the engine packs windows).
            wave = sorted(wave, key=lambda w: sum(r["audio_frames"] for r in w))
            rows: list[TranscriptRow] = []
            dead: list[DeadLetterRow] = []
            for windows in _waves(wave, settings.batch_size):
                batch = [r for w in windows for r in w]
                pending = len(todo) - report.processed
                audio = [_read_segment(out, reader, r, budget, shard, pending) for r in batch]
                detected = None
                if settings.language == "auto":
                    lid_engine = lid_engine or lid()
                    detected = lid_engine.detect(audio)
                inputs = [
                    TeacherInput(
                        r["segment_id"],
                        a,
                        _language(settings, detected[k] if detected else None),
                        window_of.get(r["segment_id"], ""),
                    )
                    for k, (r, a) in enumerate(zip(batch, audio, strict=True))
                ]
                results = _transcribe_checked(teacher, inputs)
                opinions: dict[str, tuple[str, str, float]] = {}
                if second is not None:
                    sampled = [
                        (item, result)
                        for item, result in zip(inputs, results, strict=True)
                        if isinstance(result, TeacherOutput) and is_sampled(item.segment_id, second.fraction)
                    ]
                    if sampled:
                        second_engine = second_engine or second.engine()
                        opinions = _second_opinions(second_engine, sampled, stats)
                for k, (row, result) in enumerate(zip(batch, results, strict=True)):
                    if isinstance(result, TeacherError):
                        # EngineCallFailed is suspect: its row stays pending until the third attempt fails too.
                        attempt = attempts.get(row["segment_id"], 0) + 1
                        dead.append(
                            layout.dead_letter(
                                row["segment_id"],
                                uris.get(row["media_id"], ""),
                                "transcripts",
                                result.kind,
                                str(result),
                                attempt,
                            )
                        )
                        report.fail(result.kind)
                        continue
                    rows.append(
                        TranscriptRow(
                            segment_id=row["segment_id"],
                            media_id=row["media_id"],
                            text=result.text,
                            **_language_columns(result, detected[k] if detected else None, lid_engine),
                            num_tokens=result.num_tokens,
                            avg_logprob=result.avg_logprob,
                            no_speech_prob=result.no_speech_prob,
                            compression_ratio=result.compression_ratio,
                            finish_reason=result.finish_reason,
                            model_id=result.model_id or teacher.model_id,
                            engine=teacher.name,
                            settings_hash=teacher.settings_hash,
                            prompt_version=teacher.prompt_version,
                            **_opinion_columns(opinions.get(row["segment_id"])),
                        )
                    )
                    report.ok(row["audio_frames"] / SAMPLE_RATE)
            # Dead letters first: a crash between the two writes re-labels nothing twice (the part is the commit).
            layout.append_dead_letters(out, "transcripts", shard, dead)
            if rows:
                key = layout.transcript_part_key(shard, rows[0].segment_id)
                write_table(out, key, to_table(rows, TRANSCRIPT_SCHEMA))
                report.outputs.append(key)
                # After the part that holds their labels: a crash in between leaves a stale row the next run removes.
                layout.remove_dead_letters(out, "transcripts", shard, {r.segment_id for r in rows} & retried)
            if on_wave is not None:
                report.seconds = time.perf_counter() - started
                report.totals["pending"] = len(todo) - report.processed
                on_wave(report)
    finally:
        reader.close()
    skipped = report.totals.get("skipped", 0)
    report.totals = {
        "featured": features.num_rows,
        "transcribed": existing.num_rows + report.succeeded,
        "skipped_duplicates": skipped,
        "teacher_seconds_saved": report.totals.get("teacher_seconds_saved", 0.0),
    }
    if teacher is not None:
        report.totals.update({"model_id": teacher.model_id, "settings_hash": teacher.settings_hash})
    if second is not None:
        judged = existing["disagreement"].drop_null()
        count = len(judged) + stats.segments
        report.totals.update(stats.totals())
        report.totals["second_opinions"] = count  # whole shard
        if count:
            report.totals["mean_disagreement"] = ((pc.sum(judged).as_py() or 0.0) + stats.disagreement_sum) / count
    report.seconds = time.perf_counter() - started
    return report


def _language(settings: TranscribeSettings, detected: Any) -> str:
    """The language the teacher is asked for: the fixed one, or the detected one when probable enough ("" lets the
    teacher decide)."""
    if detected is None:
        return settings.language
    return detected.language if detected.prob >= settings.min_language_prob else ""


def _language_columns(result: TeacherOutput, detected: Any, lid: Any) -> dict[str, Any]:
    """A label's language (what its text was transcribed in; with detection unsure and a teacher that does not
    say, the detected one) and that language's detected probability."""
    if detected is None:
        return {"language": result.language, "language_prob": None, "lid_model": None}
    language = result.language or detected.language
    return {"language": language, "language_prob": detected.probs.get(language, 0.0), "lid_model": lid.model_id}


def _skip_known_copies(
    out: ObjectStore, shard: str, todo: list[dict], report: StageReport, retried: set[str]
) -> list[dict]:
    """Segments the dedup index already knows as a duplicate or an evaluation-set copy never reach the teacher: each
    gets a transcript row with no text and ``finish_reason`` ``skipped:{reason}`` (its recorded outcome; the
    dataset drops it with that reason), written as its own part, and loses its retried dead letter (``retried``: the
    shard's non-final ones) as a labelled segment does, so it keeps one outcome. Returns the segments left for the
    teacher."""
    known = dedup.shard_outcomes(out, shard)
    skipped = [r for r in todo if r["segment_id"] in known]
    if not skipped:
        return todo
    rows = [
        TranscriptRow(
            segment_id=r["segment_id"],
            media_id=r["media_id"],
            text="",
            language="",
            num_tokens=0,
            avg_logprob=None,
            no_speech_prob=None,
            compression_ratio=None,
            finish_reason=dedup.SKIPPED_FINISH + known[r["segment_id"]]["reason"],
            model_id="",
            engine="dedup",
            settings_hash="",
            prompt_version="",
        )
        for r in skipped
    ]
    rows.sort(key=lambda r: r.segment_id)
    key = layout.transcript_part_key(shard, rows[0].segment_id)
    write_table(out, key, to_table(rows, TRANSCRIPT_SCHEMA))
    report.outputs.append(key)
    report.totals["skipped"] = len(rows)
    report.totals["teacher_seconds_saved"] = sum(r["audio_frames"] for r in skipped) / SAMPLE_RATE
    ids = {r.segment_id for r in rows}
    # After the part that holds their rows, as on the teacher path: a crash in between leaves a stale letter only.
    layout.remove_dead_letters(out, "transcripts", shard, ids & retried)
    return [r for r in todo if r["segment_id"] not in ids]


def _read_segment(out: ObjectStore, reader: PartReader, row: dict, budget: RetryBudget, shard: str, pending: int):
    """A segment's samples from its packed part. A failed read (UnreadableAudio) is transient: the store or the cache
    may be failing, the segment is not bad. Retried within ``budget``, then the step fails, nothing dead-lettered.

    A part on a local output root that reads but does not decode (not an I/O error) cannot get better by waiting: the
    step fails at once, naming the damaged file (nothing is dead-lettered either: the segment is fine, our copy is not).
    """
    local = out.root_uri.startswith("file://")

    def retryable(exc: BaseException) -> bool:
        if is_out_of_space(exc) or isinstance(exc, StorageAuthError):
            return False
        return isinstance(exc, OSError) or not local

    try:
        return budget.call(
            lambda: reader.read(out.local_path(row["audio_key"]), row["audio_offset"], row["audio_frames"]), retryable
        )
    except Exception as exc:
        if is_out_of_space(exc) or isinstance(exc, StorageAuthError):
            raise  # the machine's or the credentials' failure, not the segment's
        if not retryable(exc):
            raise RuntimeError(
                f"transcripts on {shard}: the packed part {out.uri_of(row['audio_key'])} is damaged (segment "
                f"{row['segment_id']}: {type(exc).__name__}: {exc}); nothing was dead-lettered. Restore it, or delete "
                f"{layout.features_key(shard)} and segment_features/{shard}/ and re-run from segment_features (the "
                "labels already made are kept: they are keyed by segment id)"
            ) from exc
        raise TransientFailure(
            "transcripts", shard, pending, f"UnreadableAudio: segment {row['segment_id']}: cannot read its audio: {exc}"
        ) from exc


def _second_opinions(
    engine: TeacherEngine, sampled: list[tuple[TeacherInput, TeacherOutput]], stats: SecondOpinionStats
) -> dict[str, tuple[str, str, float]]:
    """The second engine's text, model id and disagreement per segment id, for the sampled segments it labelled;
    failures are only counted (never raised, never dead-lettered: the teacher's label stands alone)."""
    started = time.perf_counter()
    results = _transcribe(engine, [item for item, _ in sampled])  # never raises: failures come back in their slots
    stats.seconds += time.perf_counter() - started
    opinions = {}
    for (item, label), result in zip(sampled, results, strict=True):
        if not isinstance(result, TeacherOutput):
            stats.failed += 1
            continue
        score = disagreement(label.text, result.text, label.language)
        opinions[item.segment_id] = (result.text, engine.model_id, score)
        stats.segments += 1
        stats.audio_s += len(item.audio) / SAMPLE_RATE
        stats.disagreement_sum += score
    return opinions


def _opinion_columns(opinion: tuple[str, str, float] | None) -> dict[str, str | float | None]:
    if opinion is None:
        return {"second_text": None, "second_model_id": None, "disagreement": None}
    text, model_id, score = opinion
    return {"second_text": text, "second_model_id": model_id, "disagreement": score}


def _transcribe(teacher: TeacherEngine, inputs: list[TeacherInput]) -> list:
    """The engine's results for a batch. When the whole call fails (an engine error, a wrong result count), the batch
    is split in halves and each half tried again, down to single segments: only segments that fail by themselves are
    dead-lettered, at about 2*log2(batch) extra calls per bad segment (vLLM batches of a thousand stay cheap)."""
    if not inputs:
        return []
    try:
        results = teacher.transcribe(inputs)
        if len(results) == len(inputs):
            return results
        problem = f"returned {len(results)} results"
    except Exception as exc:
        problem = f"failed ({type(exc).__name__}: {exc})"
    if len(inputs) == 1:
        return [EngineCallFailed(f"{teacher.name} {problem} on segment {inputs[0].segment_id}")]
    log.warning("teacher %s on a batch of %d; splitting it", problem, len(inputs))
    half = len(inputs) // 2
    return _transcribe(teacher, inputs[:half]) + _transcribe(teacher, inputs[half:])


def _transcribe_checked(teacher: TeacherEngine, inputs: list[TeacherInput]) -> list:
    """``_transcribe``, refusing to dead-letter a whole batch: when every segment of a batch of several failed on its
    own, the engine is what is broken (a dead GPU, a lost engine process), and the step fails instead."""
    results = _transcribe(teacher, inputs)
    if len(inputs) > 1 and all(isinstance(r, EngineCallFailed) for r in results):
        raise TeacherBroken(
            f"{teacher.name} failed on every one of {len(inputs)} segments, each tried alone ({results[0]}); "
            "nothing was dead-lettered: fix the engine and re-run the partition"
        )
    return results


def window_keys(features: pa.Table, window_s: float) -> dict[str, str]:
    """Which shared teacher window each segment goes into, for an engine that packs ``window_s`` seconds
    (``pack_windows``); empty when it does not pack.

    Windows are cut from the whole shard's segments in segment id order (a file's segments one after another, files
    in the order of their ids), never from the segments a run still has to label, and never from how they happen to
    be laid out in the packed parts (a retried or resumed `segment_features` lays them out differently): a segment's
    window, hence its label, is the same whether the shard is labelled in one run, resumed after a kill, run twice at
    once, or fed in waves of any size.
    """
    if window_s <= 0:
        return {}
    rows = features.select(["segment_id", "audio_frames"]).sort_by("segment_id").to_pylist()
    windows = pack_windows([r["audio_frames"] / SAMPLE_RATE for r in rows], window_s)
    return {rows[k]["segment_id"]: f"{rows[window[0]]['segment_id']}+" for window in windows for k in window}


def _group(todo: list[dict], window_of: dict[str, str]) -> list[list[dict]]:
    """The segments to label as windows (lists of rows, each in segment id order: the order their audio is packed
    in), in storage order of their first segment; a segment without a window alone."""
    groups: dict[str, list[dict]] = {}
    for r in todo:
        groups.setdefault(window_of.get(r["segment_id"]) or r["segment_id"], []).append(r)
    return [sorted(rows, key=lambda r: r["segment_id"]) for rows in groups.values()]


def _waves(windows: Sequence[list[dict]], size: int) -> Iterable[list[list[dict]]]:
    """Consecutive windows, about ``size`` segments together: whole windows only (a wave or a batch never splits
    one), at least one window each."""
    chunk: list[list[dict]] = []
    count = 0
    for window in windows:
        if chunk and count + len(window) > size:
            yield chunk
            chunk, count = [], 0
        chunk.append(window)
        count += len(window)
    if chunk:
        yield chunk
