"""The six partitioned assets. Thin: each reads its config, calls the stage function and reports metadata."""

import base64
import json
import os
import warnings
from collections import Counter
from pathlib import Path

import dagster as dg
import pydantic
from pydantic import Field

from asr_assets import dedup, layout, metrics
from asr_assets.calibrate import CARD_FIELDS, CARD_KEY, audit_segments, card_overrides, collect, fit_card
from asr_assets.deployment import GPU_POOL, step_tags
from asr_assets.distill import (
    Clipped,
    Disagreement,
    DistillResult,
    LanguageMismatch,
    LowAcousticQuality,
    LowConfidence,
    NearSilent,
    NoSpeech,
    PackSettings,
    RepetitionLoop,
    SpeakingRate,
    SpeakingRateOutlier,
    TooLong,
    TooShort,
    UnsureDisagreement,
    build_rules,
    distill_shard,
)
from asr_assets.lease import LeaseHeld
from asr_assets.pool import default_workers
from asr_assets.report import build_report, load_references, render_plots, report_json
from asr_assets.second_opinion import SecondOpinion, SecondOpinionStats
from asr_assets.stages import (
    DecodeSettings,
    PoolSettings,
    StageReport,
    TranscribeSettings,
    build_index,
    decode_shard,
    features_shard,
    transcribe_shard,
    vad_shard,
)
from asr_assets.stages import PackSettings as AudioPackSettings
from asr_assets.vad import VadParams, silero_model_path
from partitions import NUM_SHARDS, PARTITIONS_PER_GPU_RUN, shard_partitions
from resources.storage import StorageResource
from resources.teachers import TeacherResource

# backfill_policy is a Dagster beta parameter; the notice tells our users nothing they can act on.
warnings.filterwarnings("ignore", message=".*`backfill_policy` of function `asset` is currently in beta.*")

GROUP = "asr"
REPORT_GROUP = "reports"  # unpartitioned: kept out of the per-shard selection `group:asr`
DEDUP_GROUP = "dedup"  # unpartitioned too: one index over every shard


class PoolConfig(dg.Config):
    workers: int = Field(default=0, description="Worker processes; 0 uses every usable CPU.")
    timeout_s: float = Field(default=600.0, description="Per-item time limit; a worker past it is killed.")
    # RLIMIT_AS counts address space, not resident memory. Measured on the sample corpus (2 CPUs): decode, VAD and
    # features workers peak at 0.53-0.56 GiB virtual (160-180 MiB resident), most of it PyAV's FFmpeg libraries,
    # onnxruntime and numpy mapped at import; OpenBLAS adds ~38 MiB per core it starts a thread for (~2.4 GiB on a
    # 64-core node). VAD and features stream a file in blocks, so its length adds little (bench/RESULTS.md, long
    # files). 8 GiB leaves room for all of that; a forged stream that asks for more fails its item as MemoryLimit.
    memory_limit_gb: float = Field(
        default=8.0,
        description="Address-space cap per worker process (GiB); an item over it fails as MemoryLimit. 0: off.",
    )

    def pool(self) -> PoolSettings:
        return PoolSettings(
            workers=self.workers or default_workers(),
            timeout_s=self.timeout_s,
            memory_limit_bytes=int(self.memory_limit_gb * 2**30),
        )


class AudioWavConfig(PoolConfig):
    max_file_mb: float = Field(default=4096.0, description="Larger files are dead-lettered (TooLarge) undecoded.")
    max_duration_h: float = Field(default=6.0, description="Longer audio is dead-lettered (TooLong).")
    # A fifth: occasional dropped frames of a crawled mp3 or a short dropout in a broadcast recording cost well under
    # 5% and keep their file; past a fifth, what is left is more silence and glitches than a recording, and a label
    # transcribed from it would describe audio that is not there.
    max_damaged_fraction: float = Field(
        default=0.2,
        description="Files whose timestamp gaps and corrupt packets exceed this fraction are dead-lettered (Damaged).",
    )


class VadConfig(PoolConfig):
    threshold: float = Field(default=0.5, description="Speech probability threshold.")
    min_speech_ms: int = Field(default=250, description="Shorter speech runs are dropped.")
    min_silence_ms: int = Field(default=500, description="Pauses shorter than this stay inside a segment.")
    speech_pad_ms: int = Field(
        default=100, description="Padding on each side of a segment (100 ms measured best for WER)."
    )
    max_segment_s: float = Field(default=30.0, description="Segments are split to at most this (teacher window).")
    merge_gap_s: float | None = Field(
        default=None,
        description="Merge neighbouring segments across pauses up to this long into training-length segments "
        "(within max_segment_s, cut at the longest pauses); 0: off. Default: by teacher, with a fixed ASR_LANGUAGE: "
        "1.0 for vLLM teachers, which transcribe one segment per request (a short one pays the prompt template and "
        "a request for a few seconds of audio), 0 for faster-whisper, which packs short segments into full windows "
        "itself; 0 with ASR_LANGUAGE=auto (a merged segment could hold two languages).",
    )

    def params(self, teacher_merge_gap_s: float = 0.0) -> VadParams:
        return VadParams(
            threshold=self.threshold,
            min_speech_ms=self.min_speech_ms,
            min_silence_ms=self.min_silence_ms,
            speech_pad_ms=self.speech_pad_ms,
            max_segment_s=self.max_segment_s,
            merge_gap_s=teacher_merge_gap_s if self.merge_gap_s is None else self.merge_gap_s,
        )


class FeaturesConfig(PoolConfig):
    part_max_hours: float = Field(default=4.0, description="Packed FLAC parts roll over at this much audio.")
    log_mel_bins: int = Field(
        default=0, description="Whisper log-mel features for the student: 0 (off), 80 or 128 mel bins."
    )
    # A sample by default: scoring every segment costs 7-16x the whole CPU chain (bench/RESULTS.md); a tenth costs
    # about as much again as the chain and already gives the report a quality distribution.
    dnsmos_fraction: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Fraction of segments scored with DNSMOS (SIG, BAK, OVRL), chosen by a hash of the segment id so "
        "re-runs pick the same ones: 0 off, 1 all. The low_dnsmos rule judges only scored segments, so set 1 when it "
        "is on (and raise timeout_s for files of several hours: a file's segments are scored in one task).",
    )

    @pydantic.field_validator("log_mel_bins")
    @classmethod
    def _known_bins(cls, value: int) -> int:
        if value not in (0, 80, 128):
            raise ValueError(f"log_mel_bins must be 0, 80 or 128, got {value}")
        return value


class TranscriptsConfig(dg.Config):
    wave_size: int = Field(
        default=0, description="Segments read and checkpointed together (bounds memory); 0: the engine's default."
    )
    batch_size: int = Field(default=0, description="Segments per teacher call; 0: the engine's default.")
    index_copies_first: bool = Field(
        default=True,
        description="Before labelling, add every shard's newly fingerprinted segments to the global dedup index (as "
        "audio_fingerprints does), so copies are skipped in sensor and backfill runs too. Waits up to "
        "ASR_DEDUP_WAIT_S (120) for another run holding the index, then labels without it.",
    )


DEDUP_WAIT_ENV = "ASR_DEDUP_WAIT_S"


# DistilledConfig fields that are not rule parameters.
NOT_RULE_FIELDS = frozenset({"target_tar_mb", "threshold_card", "keep_builds_hours"})


class DistilledConfig(dg.Config):
    min_duration_s: float = Field(default=TooShort.min_s, description="too_short below this.")
    max_duration_s: float = Field(default=TooLong.max_s, description="too_long above this.")
    max_rms_dbfs: float = Field(default=NearSilent.max_rms_dbfs, description="near_silent below this level.")
    max_clip_ratio: float = Field(
        default=Clipped.max_clip_ratio, description="clipped above this fraction of full-scale samples."
    )
    max_compression_ratio: float = Field(
        default=RepetitionLoop.max_compression_ratio, description="repetition above this zlib ratio."
    )
    max_repeats: int = Field(
        default=RepetitionLoop.max_repeats, description="repetition when an n-gram occurs this many times in a row."
    )
    max_phrase_repeats: int = Field(
        default=RepetitionLoop.max_phrase_repeats,
        description="repetition when a phrase of 2-4 words occurs this many times in a row.",
    )
    no_speech_prob: float = Field(
        default=NoSpeech.min_no_speech_prob, description="no_speech above this (with logprob below -1)."
    )
    min_avg_logprob: float = Field(
        default=LowConfidence.min_avg_logprob, description="low_confidence below this mean token logprob."
    )
    confidence_quantile: float = Field(
        default=LowConfidence.quantile, description="low_confidence also below this quantile of the shard (0: off)."
    )
    min_chars_per_s: float = Field(default=SpeakingRate.min_cps, description="speaking_rate below this.")
    max_chars_per_s: float = Field(default=SpeakingRate.max_cps, description="speaking_rate above this.")
    min_cjk_chars_per_s: float = Field(
        default=SpeakingRate.min_char_cps, description="speaking_rate below this for zh, ja, ko (characters/s)."
    )
    max_cjk_chars_per_s: float = Field(
        default=SpeakingRate.max_char_cps, description="speaking_rate above this for zh, ja, ko (characters/s)."
    )
    rate_fence_k: float = Field(default=SpeakingRateOutlier.k, description="speaking_rate_outlier: IQR multiplier.")
    rate_fence_min_segments: int = Field(
        default=SpeakingRateOutlier.min_segments,
        description="speaking_rate_outlier judges a language only with this many segments in the shard.",
    )
    rate_fence_min_log_iqr: float = Field(
        default=SpeakingRateOutlier.min_log_iqr,
        description="speaking_rate_outlier: floor on the fence's inter-quartile width, in log(rate) units.",
    )
    max_disagreement: float = Field(
        default=Disagreement.max_disagreement,
        description="disagreement above this normalized error rate between the teacher and the second opinion.",
    )
    unsure_max_disagreement: float = Field(
        default=UnsureDisagreement.max_disagreement,
        description="unsure_disagreement: disagreement above this together with a logprob under the next field.",
    )
    unsure_max_avg_logprob: float = Field(
        default=UnsureDisagreement.max_avg_logprob,
        description="unsure_disagreement: mean token logprob under this together with the disagreement above.",
    )
    min_dnsmos_ovrl: float = Field(
        default=LowAcousticQuality.min_dnsmos_ovrl, description="low_dnsmos below this DNSMOS OVRL (0: off)."
    )
    mismatch_min_script_units: int = Field(
        default=LanguageMismatch.min_script_units,
        description="language_mismatch judges the script of texts with at least this many units (words; Han/kana).",
    )
    mismatch_min_script_share: float = Field(
        default=LanguageMismatch.min_script_share,
        description="language_mismatch when under this share of the text's units are in the language's scripts.",
    )
    mismatch_min_letters: int = Field(
        default=LanguageMismatch.min_letters,
        description="language_mismatch runs the text LID only on texts with at least this many letters.",
    )
    mismatch_min_prob: float = Field(
        default=LanguageMismatch.min_prob,
        description="language_mismatch when the text LID reads another language with at least this probability.",
    )
    mismatch_min_margin: float = Field(
        default=LanguageMismatch.min_margin,
        description="language_mismatch needs at least this much text LID evidence per letter (nats) for the other "
        "language over the segment's.",
    )
    mismatch_min_audio_prob: float = Field(
        default=LanguageMismatch.min_audio_prob,
        description="language_mismatch does not judge segments whose audio language ID probability is under this.",
    )
    target_tar_mb: float = Field(default=256.0, description="WebDataset tar shards roll over at this size.")
    keep_builds_hours: float = Field(
        default=24.0,
        ge=0,
        description="A dataset build that is no longer current is removed once it has not been for this long (readers "
        "of the previous manifest finish reading its tars first); the current build is never removed.",
    )
    threshold_card: str = Field(
        default="",
        description="A threshold card written by the threshold_card asset (a key under the output root, e.g. "
        "report/threshold_card.json, or a local path): its fitted min_avg_logprob, max_disagreement and rate_fence_k "
        "replace the fields above. Empty: the fields as configured.",
    )

    def rules(self, card: dict | None = None) -> list:
        """The rule set; a threshold card's thresholds take the place of the configured ones."""
        params = self.model_dump(exclude=NOT_RULE_FIELDS)
        return build_rules(**(params | (card_overrides(card) if card else {})))


def _rates(report: StageReport) -> str:
    seconds = max(report.seconds, 1e-9)
    return f"{report.processed / seconds:.2f} items/s, {report.audio_s / seconds:.1f}x realtime"


def _metadata(report: StageReport, unit: str) -> dict:
    rate = report.processed / report.seconds if report.seconds else 0.0
    meta: dict = {
        f"{unit}_processed": report.processed,
        f"{unit}_succeeded": report.succeeded,
        f"{unit}_failed": report.failed,
        "errors_by_kind": dict(report.errors),
        "audio_hours": round(report.audio_s / 3600, 4),
        f"{unit}_per_s": round(rate, 2),
        "x_realtime": round(report.audio_s / report.seconds, 1) if report.seconds else 0.0,
        "seconds": round(report.seconds, 2),
        "outputs": dg.MetadataValue.json(report.outputs[:50]),
    }
    for name, value in report.totals.items():
        meta[f"shard_{name}"] = round(value, 4) if isinstance(value, float) else value
    return meta


class MediaIndexConfig(dg.Config):
    manifest: str = Field(
        default="",
        description="A Parquet or CSV file of objects to index instead of listing ASR_SOURCE_URI: a 'uri' column "
        "(under the source) or a 'key' column (relative to it), optionally 'size', 'mtime' and 'version' (an ETag or "
        "content hash: a row whose version changed is processed again).",
    )


@dg.asset(partitions_def=shard_partitions, group_name=GROUP, kinds={"parquet"}, op_tags=step_tags("index"))
def media_index(
    context: dg.AssetExecutionContext, config: MediaIndexConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """The shard's media objects (one row per object version: media_id, uri, size, mtime, extension, version),
    appended as new ones appear; a replaced object's older row is retired."""
    with layout.step_output(storage, "media_index", context.partition_key, context.run.run_id) as out:
        report = build_index(storage.source(), out, context.partition_key, NUM_SHARDS, config.manifest or None)
        context.log.info(
            f"{context.partition_key}: {report.processed} new media, {report.totals['media']} in the shard"
        )
        metrics.record_stage("media_index", context.partition_key, report)
        return dg.MaterializeResult(
            metadata=_metadata(report, "media")
            | {"path": out.uri_of(layout.index_prefix(context.partition_key).rstrip("/"))}
        )


@dg.asset(
    partitions_def=shard_partitions, group_name=GROUP, deps=[media_index], kinds={"ffmpeg"}, op_tags=step_tags("cpu")
)
def audio_wav(
    context: dg.AssetExecutionContext, config: AudioWavConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Every indexed media object probed and decoded to 16 kHz mono FLAC, or dead-lettered with the reason."""
    with layout.step_output(storage, "audio_wav", context.partition_key, context.run.run_id) as out:
        settings = DecodeSettings(
            int(config.max_file_mb * 1024 * 1024), config.max_duration_h * 3600, config.max_damaged_fraction
        )
        report = decode_shard(storage.source(), out, context.partition_key, settings, config.pool())
        context.log.info(
            f"{context.partition_key}: decoded {report.succeeded}, failed {report.failed} {dict(report.errors)}"
        )
        metrics.record_stage("audio_wav", context.partition_key, report)
        return dg.MaterializeResult(metadata=_metadata(report, "media"))


@dg.asset(partitions_def=shard_partitions, group_name=GROUP, deps=[audio_wav], kinds={"onnx"}, op_tags=step_tags("cpu"))
def vad_segments(
    context: dg.AssetExecutionContext, config: VadConfig, storage: StorageResource, teacher: TeacherResource
) -> dg.MaterializeResult:
    """Speech segments (at most 30 s) found by Silero VAD, with the model hash and parameters."""
    # With language detection, merging would put two speakers' languages in one segment (a turn change is a short
    # pause), and a segment gets one language: the teacher's merge default applies only with a fixed language.
    params = config.params(0.0 if teacher.detects_language else teacher.engine_class().merge_gap_s)
    with layout.step_output(storage, "vad_segments", context.partition_key, context.run.run_id) as out:
        report = vad_shard(out, context.partition_key, params, silero_model_path(), config.pool())
        metrics.record_stage("vad_segments", context.partition_key, report)
        return dg.MaterializeResult(metadata=_metadata(report, "media") | {"vad_params": params.to_json()})


@dg.asset(
    partitions_def=shard_partitions, group_name=GROUP, deps=[vad_segments], kinds={"flac"}, op_tags=step_tags("cpu")
)
def segment_features(
    context: dg.AssetExecutionContext, config: FeaturesConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Each segment cut, measured (levels, clipping, SNR, VAD stats, DNSMOS on a sample) and packed into the shard's
    FLAC parts."""
    with layout.step_output(storage, "segment_features", context.partition_key, context.run.run_id) as out:
        pack = AudioPackSettings(config.part_max_hours * 3600)
        report = features_shard(
            out, context.partition_key, pack, config.pool(), config.log_mel_bins, config.dnsmos_fraction
        )
        metrics.record_stage("segment_features", context.partition_key, report)
        return dg.MaterializeResult(metadata=_metadata(report, "segments"))


def _index_copies(context: dg.AssetExecutionContext, storage: StorageResource) -> None:
    """The global dedup index brought up to date before the teacher runs: the segments every shard fingerprinted
    since the index's last run are added, and the copies among them are skipped below instead of labelled. Without it
    (another run held the index past ``ASR_DEDUP_WAIT_S``) copies are labelled, and dropped once the index knows."""
    wait = float(os.environ.get(DEDUP_WAIT_ENV, "120"))
    store = layout.dataset_output(storage)
    try:
        report = dedup.refresh(store, shard_partitions.get_partition_keys(), context.run.run_id, wait_s=wait)
    except Exception as exc:  # noqa: BLE001 - the labels matter more than the skip: audio_fingerprints reports it
        context.log.warning(
            f"the dedup index could not be brought up to date ({type(exc).__name__}: {exc}); labelling without it, "
            "copies among the new segments are dropped by distilled_dataset once audio_fingerprints runs"
        )
        return
    if report is None:
        context.log.warning(
            f"the dedup index was held by another run for {wait:.0f} s ({DEDUP_WAIT_ENV}): labelling without "
            "updating it; copies among the new segments are dropped by distilled_dataset once audio_fingerprints runs"
        )
    elif report.new_segments:
        context.log.info(
            f"dedup index generation {report.generation}: {report.new_segments} new segments, duplicates "
            f"{dict(report.duplicates)}, evaluation-set matches {dict(report.eval_matches)}"
        )


@dg.asset(
    partitions_def=shard_partitions,
    group_name=GROUP,
    deps=[segment_features],
    kinds={"vllm"},
    op_tags=step_tags("gpu"),
    pool=GPU_POOL,
    # Starting a GPU engine costs minutes (weights, profiling, graph capture): a backfill hands each run several
    # shards so one engine serves them all.
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=PARTITIONS_PER_GPU_RUN),
)
def transcripts(
    context: dg.AssetExecutionContext, config: TranscriptsConfig, storage: StorageResource, teacher: TeacherResource
) -> dg.MaterializeResult:
    """Teacher labels for every segment, written in parts as they complete (a killed step resumes). A run over a
    range of shards labels them one after another with one loaded engine."""
    engine = teacher.engine_class()
    settings = TranscribeSettings(
        config.wave_size or engine.wave_size,
        config.batch_size or engine.batch_size,
        teacher.language,
        teacher.min_language_prob,
    )
    second = None
    if teacher.second_opinion_spec() is not None:
        second = SecondOpinion(teacher.load_second_opinion, teacher.second_opinion_fraction)
    total = StageReport()
    opinions = SecondOpinionStats()
    per_shard: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    if config.index_copies_first:
        _index_copies(context, storage)
    for shard in context.partition_keys:

        def progress(report: StageReport, shard: str = shard) -> None:
            loaded = teacher.loaded()
            engine_rates = ""
            if loaded is not None:
                metrics.observe_teacher(loaded)
                engine_rates = ", ".join(f"{k} {v:.3g}" for k, v in loaded.metrics().items())
            context.log.info(
                f"{shard}: {report.succeeded} labelled, {report.failed} failed, {report.totals.get('pending', 0)} "
                f"waiting, {_rates(report)}; engine: {engine_rates or 'n/a'}"
            )
            metrics.record_stage("transcripts", shard, report)
            metrics.set_queue_depth("transcripts", int(report.totals.get("pending", 0)))

        try:
            with layout.step_output(storage, "transcripts", shard, context.run.run_id) as out:
                report = transcribe_shard(
                    out, shard, teacher.load, settings, on_wave=progress, second=second, lid=teacher.load_lid
                )
        except LeaseHeld as exc:
            if len(context.partition_keys) == 1:
                raise
            # A run over a range (a backfill) goes on with its other shards (the engine is loaded: minutes of GPU
            # start-up) and fails at the end naming the shards it left; pending_work or a re-run picks them up.
            context.log.warning(f"{shard}: skipped, its lease is held: {exc}")
            skipped[shard] = str(exc)
            continue
        finally:
            metrics.set_queue_depth("transcripts", 0)  # a failed step leaves nothing waiting either
        metrics.record_stage("transcripts", shard, report)
        per_shard[shard] = {"labelled": report.succeeded, "failed": report.failed, **report.totals}
        total.merge(report)
        opinions.merge(SecondOpinionStats.from_totals(report.totals))
    meta = _metadata(total, "segments") | {"teacher_engine": teacher.engine}
    if second is not None:
        meta |= {"second_opinion": teacher.second_opinion, "second_opinion_fraction": second.fraction}
        meta |= opinions.metadata()
    if len(per_shard) > 1:
        meta["per_shard"] = dg.MetadataValue.json(per_shard)
    loaded = teacher.loaded()
    if loaded is not None:
        meta |= {f"teacher_{k}": round(v, 3) for k, v in loaded.metrics().items()}
    if skipped:
        raise dg.Failure(
            f"transcripts: {len(skipped)} of {len(context.partition_keys)} shards were being written by another run "
            f"and were left for a later run: {', '.join(sorted(skipped))} (the others are labelled)",
            metadata=meta | {"skipped_shards": dg.MetadataValue.json(skipped)},
        )
    return dg.MaterializeResult(metadata=meta)


@dg.asset(
    partitions_def=shard_partitions,
    group_name=GROUP,
    deps=[transcripts],
    kinds={"webdataset"},
    op_tags=step_tags("light"),
)
def distilled_dataset(
    context: dg.AssetExecutionContext, config: DistilledConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Filtered labels packed as WebDataset tars, a Parquet manifest, and per-file transcripts (JSONL)."""
    with layout.step_output(storage, "distilled_dataset", context.partition_key, context.run.run_id) as out:
        pack = PackSettings(int(config.target_tar_mb * 1024 * 1024))
        card = _read_card(out, config.threshold_card) if config.threshold_card else None
        shard = context.partition_key
        result = distill_shard(out, shard, config.rules(card), pack, config.keep_builds_hours)
        meta = _metadata(result.report, "segments")
        # A filter drop is a decision, not an error: name the counts for what they are.
        meta["segments_kept"] = meta.pop("segments_succeeded")
        meta["segments_dropped"] = meta.pop("segments_failed")
        meta["dropped_by_reason"] = dict(meta.pop("errors_by_kind"))
        meta |= _build_metadata(context, out, shard, result)
        if card:
            meta["threshold_card"] = dg.MetadataValue.json({k: card[k] for k in ("thresholds", "inputs_sha")})
        return dg.MaterializeResult(metadata=meta)


def _build_metadata(context: dg.AssetExecutionContext, out, shard: str, result: DistillResult) -> dict:
    """The build this run made current (or found current) and what changed from the one before; logs a warning when
    samples kept earlier are dropped because a shard-fitted rule moved, or when a newer build won a race."""
    changes = result.changes
    if result.current != result.build_id:
        context.log.warning(
            f"{shard}: build {result.build_id} was not committed: build {result.current}, made from newer inputs, is "
            "current already"
        )
    for rule, count in changes["removed_by_refit"].items():
        context.log.warning(
            f"{shard}: {count} samples kept by build {result.previous} are dropped by {rule}: its shard-fitted "
            f"thresholds moved with the shard's new segments (see {layout.changes_key(shard, result.build_id)})"
        )
    return {
        "build_id": result.current,
        "previous_build": result.previous or "",
        "committed": result.committed,
        "samples_added": changes["samples_added"],
        "samples_removed": changes["samples_removed"],
        "added_by_reason": dg.MetadataValue.json(changes["added_by_reason"]),
        "removed_by_reason": dg.MetadataValue.json(changes["removed_by_reason"]),
        "files_jsonl": out.uri_of(layout.files_key(shard, result.current)),
    }


def _read_card(out, where: str) -> dict:
    """A threshold card from a local file, else a key under the output root; a missing or malformed card fails the
    step."""
    path = Path(where)
    try:
        blob = path.read_bytes() if path.is_file() else out.read_bytes(where)
        card = json.loads(blob)
        card_overrides(card)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"distilled_dataset: threshold card {where!r} cannot be used: {exc}") from exc
    return card


class ThresholdCardConfig(dg.Config):
    audit: str = Field(
        description="JSONL of reference transcripts for some files ({'path' or 'uri', 'text'} per file, the "
        "report's references format): the audit set the thresholds are fitted on."
    )
    target_wer: float = Field(default=0.05, description="The kept labels' WER to stay under on the audit set.")


@dg.asset(group_name=REPORT_GROUP, deps=[transcripts], kinds={"python"})
def threshold_card(config: ThresholdCardConfig, storage: StorageResource) -> dg.MaterializeResult:
    """Filter thresholds fitted on an audit set: the most hours whose kept labels' WER stays under the target
    (report/threshold_card.json; give it to distilled_dataset's ``threshold_card``)."""
    out = storage.output()
    candidates, files, _ = collect(out, shard_partitions.get_partition_keys())
    audited = audit_segments(files, load_references(config.audit, storage.source()))
    base = DistilledConfig().model_dump(exclude={*NOT_RULE_FIELDS, *CARD_FIELDS})
    card = fit_card(candidates, audited, base, config.target_wer)
    out.put_bytes(CARD_KEY, json.dumps(card, indent=2, sort_keys=True).encode())
    effect = card["effect"]
    return dg.MaterializeResult(
        metadata={
            "thresholds": dg.MetadataValue.json(card["thresholds"]),
            "target_met": card["target_met"],
            "hours_kept": effect["hours_kept"],
            "hours_all": effect["hours_all"],
            "wer_all": effect["wer_all"],
            "wer_kept": effect["wer_kept"],
            "wer_kept_ci95": dg.MetadataValue.json(effect["wer_kept_ci95"]),
            "audited_segments": effect["audited_segments"],
            "card": out.uri_of(CARD_KEY),
        }
    )


class ReportConfig(dg.Config):
    references: str = Field(
        default="",
        description="Optional JSONL of reference transcripts ({'path' or 'uri', 'text'} per file) for label WER.",
    )


@dg.asset(group_name=REPORT_GROUP, deps=[distilled_dataset], kinds={"python"})
def distillation_report(config: ReportConfig, storage: StorageResource) -> dg.MaterializeResult:
    """Hours in and kept, drops by reason, duration / speaking-rate / confidence distributions over every shard, and
    (with references) the WER of all labels against the WER of the kept labels."""
    out = storage.output()
    references = load_references(config.references, storage.source()) if config.references else None
    report, dist = build_report(out, shard_partitions.get_partition_keys(), references)
    out.put_bytes("report/report.json", report_json(report))
    images = []
    for name, png in render_plots(dist).items():
        out.put_bytes(f"report/{name}.png", png)
        images.append(f"### {name}\n![{name}](data:image/png;base64,{base64.b64encode(png).decode()})")
    drops = "\n".join(
        f"| {reason} | {count} | {report.dropped_hours_by_reason[reason]:.4f} |"
        for reason, count in report.dropped_by_reason.items()
    )
    meta = {
        "headline": report.headline(),
        "hours_in": round(report.hours_in, 4),
        "kept_hours": round(report.kept_hours, 4),
        "kept": report.kept,
        "transcribed": report.transcribed,
        "dead_letter": report.dead_letter,
        "dropped_by_reason": dg.MetadataValue.md("| reason | segments | hours |\n|---|---|---|\n" + drops),
        "plots": dg.MetadataValue.md("\n\n".join(images)),
        "report_json": out.uri_of("report/report.json"),
    }
    if report.second_opinion_segments:
        meta["second_opinion_segments"] = report.second_opinion_segments
        meta["estimated_label_error_rate"] = dg.MetadataValue.json(report.estimated_error_rate)
    if report.dedup:
        meta["duplicate_hours_by_kind"] = dg.MetadataValue.json(
            {k: v["hours"] for k, v in report.dedup["duplicates_by_kind"].items()}
        )
        meta["teacher_hours_saved"] = report.dedup["teacher_hours_saved"]
        meta["eval_contamination"] = dg.MetadataValue.json(
            {k: v["segments"] for k, v in report.dedup["eval_matches"].items()}
        )
    if report.dnsmos_scored:
        meta["dnsmos_scored"] = report.dnsmos_scored
        meta["dnsmos_ovrl_median"] = dg.MetadataValue.json(report.dnsmos_ovrl_median)
    if report.wer_all is not None:
        meta |= {
            "wer_all_labels": round(report.wer_all, 4),
            "wer_kept_labels": round(report.wer_kept, 4),
            "wer_files_kept_text": round(report.wer_files_kept_text, 4),
            "referenced_files": report.referenced_files,
        }
    if report.cer_all is not None:
        meta |= {
            "cer_all_labels": round(report.cer_all, 4),
            "cer_kept_labels": None if report.cer_kept is None else round(report.cer_kept, 4),
            "referenced_files": report.referenced_files,
        }
    if report.error_rate_by_language:
        meta["error_rate_by_language"] = dg.MetadataValue.json(report.error_rate_by_language)
    meta["languages"] = dg.MetadataValue.json(report.languages)
    return dg.MaterializeResult(metadata=meta)


class EvalSetsConfig(dg.Config):
    eval_sets: str = Field(
        default="",
        description="Evaluation sets as 'name=uri;name=uri': a folder, file:// or oss:// uri of audio, or a .txt "
        "manifest of keys (one a line) relative to its folder. Empty: the ASR_EVAL_SETS environment variable.",
    )
    allow_unreadable: bool = Field(
        default=False,
        description="Register the readable files even when some evaluation files cannot be decoded (they are listed "
        "in the metadata). Off: such a run fails and registers nothing, since the guard could not cover those files.",
    )


def _eval_sources(storage: StorageResource, spec: str) -> dict:
    sets = {}
    for name, uri in dedup.parse_eval_sets(spec).items():
        folder, manifest = (uri.rsplit("/", 1) if "/" in uri else (".", uri)) if uri.endswith(".txt") else (uri, None)
        store = storage.store_at(folder, f"ASR_EVAL_SETS[{name}]")
        sets[name] = (store, dedup.eval_keys(store, manifest))
    return sets


@dg.asset(group_name=DEDUP_GROUP, kinds={"python"})
def eval_sets(context: dg.AssetExecutionContext, config: EvalSetsConfig, storage: StorageResource):
    """The evaluation sets no training segment may come from: every file decoded and fingerprinted once
    (dedup/eval/index.parquet); audio_fingerprints drops training segments that match them."""
    spec = config.eval_sets or os.environ.get("ASR_EVAL_SETS", "")
    out = storage.output()
    table, problems = dedup.fingerprint_eval_sets(out, _eval_sources(storage, spec))
    for problem in problems:
        context.log.warning(f"evaluation file not registered (it cannot be decoded): {problem}")
    if problems and not config.allow_unreadable:
        # A training segment copied from one of these files could not be caught: no partial guard is published.
        raise dg.Failure(
            description=f"{len(problems)} evaluation files cannot be decoded, so no training segment could be checked "
            f"against them; fix or remove them, or set allow_unreadable: {problems[:5]}",
            metadata={"unreadable": dg.MetadataValue.json(problems)},
        )
    dedup.write_eval_sets(out, table)
    per_set = dict(sorted(Counter(table["eval_set"].to_pylist()).items()))
    return dg.MaterializeResult(
        metadata={
            "files_per_set": dg.MetadataValue.json(per_set),
            "hours": round(sum(table["duration_s"].to_pylist()) / 3600, 4),
            "unreadable": dg.MetadataValue.json(problems),
        }
    )


@dg.asset(group_name=DEDUP_GROUP, deps=[segment_features, eval_sets], kinds={"numpy"})
def audio_fingerprints(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """The global fingerprint index over every shard: adds the segments fingerprinted since the last run (nothing is
    recomputed), records each later copy of a recording as a duplicate of the kept one (first indexed, then smallest
    uri) and the segments that match an evaluation set. transcripts skips them; distilled_dataset drops them."""
    # One writer at a time: two runs would both write generation N+1. The index is global, so its lease is held
    # under a pseudo-shard; a second run fails fast naming the holder (or waits, per ASR_LEASE_WAIT_S).
    store = layout.dataset_output(storage)
    report = dedup.refresh(store, shard_partitions.get_partition_keys(), context.run.run_id, raise_held=True)
    context.log.info(
        f"generation {report.generation}: {report.new_segments} new segments, duplicates {dict(report.duplicates)}, "
        f"evaluation-set matches {dict(report.eval_matches)}"
    )
    return dg.MaterializeResult(
        metadata={
            "new_segments": report.new_segments,
            "generation": report.generation,
            "index_rows": report.index_rows,
            "duplicates_by_kind": dg.MetadataValue.json(dict(report.duplicates)),
            "duplicate_hours_by_kind": dg.MetadataValue.json(
                {k: round(v, 4) for k, v in report.duplicate_hours.items()}
            ),
            "new_eval_matches_by_set": dg.MetadataValue.json(dict(report.eval_matches)),
            "eval_matches_by_set": dg.MetadataValue.json(dedup.eval_match_counts(store)),
        }
    )
