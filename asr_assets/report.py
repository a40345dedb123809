"""The distillation report over every shard: hours in and kept, drops by reason, distributions, and the filters' value.

When reference transcripts are given for some files, the report measures the word error rate of all teacher labels
and of the kept labels on those files, so what the filters buy is measured, not assumed. Languages written without
spaces (zh, ja, ko, th) are measured by character error rate instead (``calibrate.label_error_rate``), and every
number is also given per language.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.compute as pc

from asr_assets import dedup, layout
from asr_assets.calibrate import audit_segments, label_errors
from asr_assets.distill import FILES_SCHEMA, chars_per_s, voiced_seconds
from asr_assets.languages import error_metric, majority_language
from asr_assets.records import AUDIO_SCHEMA, DECISION_SCHEMA, FEATURE_SCHEMA, SEGMENT_SCHEMA
from asr_assets.second_opinion import row_disagreement
from asr_assets.stages import read_transcripts
from resources.storage import ObjectStore, read_table


@dataclass
class Report:
    """Whole-dataset numbers.

    Attributes:
        shards: shards that have a dataset.
        media: indexed media objects.
        decoded: media decoded.
        dead_letter: media dead-lettered by audio_wav.
        hours_in: decoded audio, hours.
        segments: VAD segments.
        speech_hours: audio inside segments, hours.
        transcribed: segments with a teacher label.
        kept: segments in the dataset.
        kept_hours: audio of the kept segments, hours.
        dropped_by_reason: dropped segments by first reason.
        dropped_hours_by_reason: dropped audio by first reason, hours.
        referenced_files: files with a reference transcript that the WERs cover.
        wer_all: WER of every teacher label on those files (None without references): each file's reference is split
            over its segments by alignment (``calibrate.segment_references``), and the errors of all labelled
            segments are summed over the words they cover.
        wer_kept: the same over the kept labels only: the error rate of what a student trains on. (A file-level WER
            of the kept text would count every dropped segment's words as deletions and rise with every drop.)
        wer_files_kept_text: the file-level WER of the kept text against the whole reference, dropped segments
            counting as deletions (what a user comparing whole-file transcripts sees).
        second_opinion_segments: labelled segments that got a second opinion.
        estimated_error_rate: per shard, from the second opinion alone (no reference needed): the mean disagreement
            between teacher and second opinion over the sampled segments, for all labels and for the kept ones,
            with a 95% interval (normal approximation). A proxy, not a measurement: errors both models share are
            invisible to it (on real speech, bench/RESULTS.md, many teacher errors had disagreement 0), and errors
            of the second model alone count. An audit set (threshold_card) measures the real rate.
        dnsmos_scored: segments with a DNSMOS score.
        dnsmos_ovrl_median: median DNSMOS OVRL of the scored segments, all and kept.
        cer_all, cer_kept, cer_files_kept_text: the same three figures as the WERs, as character error rates, over
            the referenced files in languages measured in characters (zh, ja, ko, th); the ``wer_*`` figures cover
            the files in the other languages. None where no referenced file is in such a language.
        languages: per language (a segment's ``language``; a file's majority language, ``und`` for a file with no
            transcribed segment): ``files`` and ``hours_in`` (the files of the current builds), ``transcribed``
            (labelled segments with a decision), ``kept``, ``kept_hours``, ``dropped_by_reason`` and
            ``dropped_hours_by_reason``; each sums over the languages to the total above.
        error_rate_by_language: per language of the referenced files: ``metric`` (``wer`` or ``cer``), ``files``,
            ``all``, ``kept`` and ``files_kept_text`` (as ``wer_all``, ``wer_kept``, ``wer_files_kept_text``).
        dedup: duplicates and evaluation-set matches (``dedup.summary``): segments and hours by duplicate kind,
            teacher hours saved by skipping known copies, and the matches per evaluation set.
    """

    shards: int = 0
    media: int = 0
    decoded: int = 0
    dead_letter: int = 0
    hours_in: float = 0.0
    segments: int = 0
    speech_hours: float = 0.0
    transcribed: int = 0
    kept: int = 0
    kept_hours: float = 0.0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    dropped_hours_by_reason: dict[str, float] = field(default_factory=dict)
    referenced_files: int = 0
    wer_all: float | None = None
    wer_kept: float | None = None
    wer_files_kept_text: float | None = None
    second_opinion_segments: int = 0
    estimated_error_rate: dict[str, dict] = field(default_factory=dict)
    dnsmos_scored: int = 0
    dnsmos_ovrl_median: dict[str, float | None] = field(default_factory=dict)
    cer_all: float | None = None
    cer_kept: float | None = None
    cer_files_kept_text: float | None = None
    languages: dict[str, dict] = field(default_factory=dict)
    error_rate_by_language: dict[str, dict] = field(default_factory=dict)
    dedup: dict = field(default_factory=dict)

    def headline(self) -> str:
        """One line a person reads first."""
        line = (
            f"{self.hours_in:.3f} h in, {self.kept_hours:.3f} h kept ({self.kept} of {self.transcribed} labelled "
            f"segments); dead-lettered files: {self.dead_letter}; drops: {self.dropped_by_reason or 'none'}"
        )
        if self.wer_all is not None and self.wer_kept is not None:
            line += (
                f"; WER on {self.referenced_files} referenced files: all labels {self.wer_all:.3f}, "
                f"kept {self.wer_kept:.3f}"
            )
        if self.cer_all is not None and self.cer_kept is not None:
            line += f"; CER (zh/ja/ko/th files): all labels {self.cer_all:.3f}, kept {self.cer_kept:.3f}"
        if len(self.languages) > 1:
            line += "; kept hours by language: " + ", ".join(
                f"{lang} {v['kept_hours']:.3f}" for lang, v in sorted(self.languages.items())
            )
        if self.second_opinion_segments:
            rates = [v["all"] for v in self.estimated_error_rate.values() if v["all"] is not None]
            line += (
                f"; second opinion on {self.second_opinion_segments} segments, estimated label error rate "
                f"{min(rates):.3f}-{max(rates):.3f} across shards"
            )
        return line


@dataclass
class Distributions:
    """Per-segment values behind the plots: kept flag, duration (s), chars per voiced second, mean token logprob,
    second-opinion disagreement and DNSMOS OVRL (NaN where not computed), language and first drop reason ("" when
    kept)."""

    kept: np.ndarray
    duration: np.ndarray
    chars_per_s: np.ndarray
    avg_logprob: np.ndarray
    disagreement: np.ndarray
    dnsmos_ovrl: np.ndarray
    language: np.ndarray = field(default_factory=lambda: np.array([], str))
    drop_reason: np.ndarray = field(default_factory=lambda: np.array([], str))


def _mean_ci(values: list[float]) -> dict:
    """Mean and 95% normal-approximation interval of per-segment values (None when there are none)."""
    if not values:
        return {"n": 0, "mean": None, "ci95": None}
    x = np.asarray(values, float)
    half = 1.96 * float(x.std(ddof=1)) / np.sqrt(x.size) if x.size > 1 else float("nan")
    mean = float(x.mean())
    ci = None if np.isnan(half) else [round(max(0.0, mean - half), 4), round(min(1.0, mean + half), 4)]
    return {"n": int(x.size), "mean": round(mean, 4), "ci95": ci}


def build_report(
    out: ObjectStore, shards: list[str], references: dict[str, str] | None = None
) -> tuple[Report, Distributions]:
    """Reads every shard's tables and returns the report and the per-segment distributions.

    Args:
        out: the output root.
        shards: partition keys to include (shards without outputs are skipped).
        references: reference text by source uri, for the files that have one.
    """
    report = Report()
    drops: Counter = Counter()
    drop_s: Counter = Counter()
    kept_flags, durations, rates, logprobs, disagreements, dnsmos, languages, reasons = ([] for _ in range(8))
    all_text: dict[str, str] = {}
    kept_text: dict[str, str] = {}
    file_language: dict[str, str | None] = {}
    files_by_language: Counter = Counter()
    hours_by_language: Counter = Counter()
    segs_of: dict[str, list[tuple[str, str, str]]] = {}
    copy_of: dict[str, str] = {}  # a known copy skipped before the teacher (no label) -> the segment it copies
    kept_ids: set[str] = set()
    for shard in shards:
        index = layout.read_index(out, shard)
        if not index.num_rows:
            continue
        report.shards += 1
        audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
        # The current dataset build's decisions and per-file transcripts (none before the first build).
        build = layout.current_build(out, shard)
        decisions = (
            read_table(out, layout.decisions_key(shard, build), DECISION_SCHEMA)
            if build
            else DECISION_SCHEMA.empty_table()
        )
        features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA).select(
            ["segment_id", "duration_s", "dnsmos_ovrl"]
        )
        transcripts = read_transcripts(out, shard).select(
            ["segment_id", "text", "avg_logprob", "language", "second_text"]
        )
        segments = read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA)
        voiced = dict(zip(segments["segment_id"].to_pylist(), segments["speech_s"].to_pylist(), strict=True))
        shard_dis: dict[str, list[float]] = {"all": [], "kept": []}
        report.media += index.num_rows
        report.decoded += pc.sum(pc.equal(audio["status"], "decoded")).as_py() or 0
        report.dead_letter += layout.read_dead_letters(out, "audio_wav", shard).num_rows
        report.hours_in += (pc.sum(audio["duration_s"]).as_py() or 0.0) / 3600
        report.segments += segments.num_rows
        report.speech_hours += (pc.sum(pc.subtract(segments["end_s"], segments["start_s"])).as_py() or 0.0) / 3600
        report.transcribed += transcripts.num_rows

        joined = decisions.select(["segment_id", "kept", "drop_reason"]).join(features, "segment_id")
        joined = joined.join(transcripts, "segment_id")
        for row in joined.to_pylist():
            seconds = row["duration_s"]
            kept_flags.append(row["kept"])
            durations.append(seconds)
            rates.append(
                chars_per_s(row["text"], voiced_seconds(seconds, voiced.get(row["segment_id"])), row["language"])
            )
            # A copy skipped before the teacher has no language of its own: undetermined, as a file without one is.
            languages.append(row["language"] or "und")
            reasons.append("" if row["kept"] else row["drop_reason"])
            logprobs.append(row["avg_logprob"] if row["avg_logprob"] is not None else np.nan)
            score = row_disagreement(row)  # as the rules saw it
            disagreements.append(score if score is not None else np.nan)
            dnsmos.append(row["dnsmos_ovrl"] if row["dnsmos_ovrl"] is not None else np.nan)
            if score is not None:
                shard_dis["all"].append(score)
                if row["kept"]:
                    shard_dis["kept"].append(score)
            if row["kept"]:
                report.kept += 1
                report.kept_hours += seconds / 3600
            else:
                drops[row["drop_reason"]] += 1
                drop_s[row["drop_reason"]] += seconds

        if shard_dis["all"]:
            report.second_opinion_segments += len(shard_dis["all"])
            est = {part: _mean_ci(values) for part, values in shard_dis.items()}
            report.estimated_error_rate[shard] = {
                "all": est["all"]["mean"],
                "all_ci95": est["all"]["ci95"],
                "kept": est["kept"]["mean"],
                "kept_ci95": est["kept"]["ci95"],
                "sampled": est["all"]["n"],
            }
        if build:
            for f in read_table(out, layout.files_parquet_key(shard, build), FILES_SCHEMA).to_pylist():
                labelled = [s for s in f["segments"] if s["text"] is not None]
                all_text[f["uri"]] = " ".join(s["text"] for s in labelled)
                kept_text[f["uri"]] = f["text"]
                # Builds written before language ID have no segment or file language: those were English.
                language = f["language"] or majority_language([(s["language"], 1.0) for s in labelled])
                file_language[f["uri"]] = language or ("en" if labelled else None)
                files_by_language[file_language[f["uri"]] or "und"] += 1
                hours_by_language[file_language[f["uri"]] or "und"] += (f["duration_s"] or 0.0) / 3600
                copies = {s["segment_id"]: s["duplicate_of"] for s in f["segments"] if s["text"] is None}
                copy_of.update({sid: kept for sid, kept in copies.items() if kept is not None})
                segs_of[f["uri"]] = [
                    (s["segment_id"], s["text"], s["language"] or "en")
                    for s in f["segments"]
                    if s["text"] is not None or s["segment_id"] in copy_of
                ]
                kept_ids.update(s["segment_id"] for s in labelled if s["status"] == "kept")
    report.dropped_by_reason = dict(sorted(drops.items()))
    report.dropped_hours_by_reason = {k: round(v / 3600, 5) for k, v in sorted(drop_s.items())}
    stand_ins = _stand_in_copies(segs_of, copy_of)
    if references:
        covered = [uri for uri in references if uri in all_text or uri in kept_text]
        if covered:
            report.referenced_files = len(covered)
            _error_rates(report, covered, references, kept_text, segs_of, kept_ids, file_language, stand_ins)
    dist = Distributions(
        np.array(kept_flags, bool),
        np.array(durations, float),
        np.array(rates, float),
        np.array(logprobs, float),
        np.array(disagreements, float),
        np.array(dnsmos, float),
        np.array(languages, str),
        np.array(reasons, str),
    )
    report.languages = _by_language(dist, files_by_language, hours_by_language)
    scored = np.isfinite(dist.dnsmos_ovrl)
    report.dnsmos_scored = int(scored.sum())
    for part, mask in (("all", scored), ("kept", scored & dist.kept)):
        report.dnsmos_ovrl_median[part] = round(float(np.median(dist.dnsmos_ovrl[mask])), 3) if mask.any() else None
    report.dedup = dedup.summary(out, shards)
    return report, dist


def _error_rates(
    report: Report,
    covered: list[str],
    references: dict[str, str],
    kept_text: dict[str, str],
    segs_of: dict[str, list[tuple[str, str, str]]],
    kept_ids: set[str],
    file_language: dict[str, str | None],
    stand_ins: set[str],
) -> None:
    """Fills the report's label error rates: overall WER (word languages) and CER (zh/ja/ko/th), and per language.

    Texts are compared in canonical form ("press one" and "Press 1." are the same words, as for the second opinion),
    each in its file's language.
    """
    languages = {uri: file_language.get(uri) or "en" for uri in covered}
    audited = audit_segments(segs_of, {u: references[u] for u in covered})
    audited = {sid: a for sid, a in audited.items() if sid not in stand_ins}
    file_errors = {u: label_errors(references[u], kept_text.get(u, ""), languages[u]) for u in covered}
    for language in sorted(set(languages.values())):
        files = {u for u in covered if languages[u] == language}
        mine = [(sid, a) for sid, a in audited.items() if a.file in files]
        report.error_rate_by_language[language] = {
            "metric": error_metric(language),
            "files": len(files),
            "all": _round(_segment_wer(mine)),
            "kept": _round(_segment_wer((sid, a) for sid, a in mine if sid in kept_ids)),
            "files_kept_text": _round(_ratio([file_errors[u] for u in files])),
        }
    for metric in ("wer", "cer"):
        files = {u for u in covered if error_metric(languages[u]) == metric}
        if not files:
            continue
        mine = [(sid, a) for sid, a in audited.items() if a.file in files]
        setattr(report, f"{metric}_all", _segment_wer(mine))
        setattr(report, f"{metric}_kept", _segment_wer((sid, a) for sid, a in mine if sid in kept_ids))
        setattr(report, f"{metric}_files_kept_text", _ratio([file_errors[u] for u in files]))


def _stand_in_copies(segs_of: dict[str, list[tuple[str, str | None, str]]], copy_of: dict[str, str]) -> set[str]:
    """A known copy skipped before the teacher has no label: its file's reference is split over the segments with the
    kept copy's label in its place (else its words would count as deletions of its neighbours). Puts those labels in
    (dropping a copy whose kept segment has none) and returns the ids standing in so: they are not measured."""
    text_of = {sid: text for segs in segs_of.values() for sid, text, _ in segs if text is not None}
    stand_ins = {sid for sid in copy_of if copy_of[sid] in text_of}
    for uri, segs in segs_of.items():
        segs_of[uri] = [
            (sid, text_of[copy_of[sid]] if sid in stand_ins else text, lang)
            for sid, text, lang in segs
            if text is not None or sid in stand_ins
        ]
    return stand_ins


def _ratio(counts: list[tuple[int, int]]) -> float | None:
    """Summed errors over summed reference units of (errors, units) pairs; None when they cover no unit."""
    units = sum(n for _, n in counts)
    return sum(e for e, _ in counts) / units if units else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _by_language(dist: Distributions, files: Counter, hours_in: Counter) -> dict[str, dict]:
    """Per-language accounting of the labelled segments (``Report.languages``)."""
    out: dict[str, dict] = {}
    for language in sorted(set(dist.language.tolist()) | set(files)):
        mine = dist.language == language
        kept, dropped = mine & dist.kept, mine & ~dist.kept
        drops = Counter(dist.drop_reason[dropped].tolist())
        seconds = Counter()
        for reason, duration in zip(dist.drop_reason[dropped].tolist(), dist.duration[dropped].tolist(), strict=True):
            seconds[reason] += duration
        out[language] = {
            "files": files.get(language, 0),
            "hours_in": round(hours_in.get(language, 0.0), 5),
            "transcribed": int(mine.sum()),
            "kept": int(kept.sum()),
            "kept_hours": round(float(dist.duration[kept].sum()) / 3600, 5),
            "dropped_by_reason": dict(sorted(drops.items())),
            "dropped_hours_by_reason": {k: round(v / 3600, 5) for k, v in sorted(seconds.items())},
        }
    return out


def _segment_wer(audited) -> float | None:
    """Errors over reference words of the given (segment id, Audited) pairs; None when they cover no word."""
    errors = words = 0
    for _, a in audited:
        errors += a.errors
        words += a.ref_words
    return errors / words if words else None


def load_references(path: str, source: ObjectStore) -> dict[str, str]:
    """Reference texts from a JSONL file: one object per file with ``text`` and either ``uri`` or ``path`` (relative
    to the source root). Entries marked ``broken`` or with empty text are skipped."""
    refs = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            item = json.loads(line)
            if item.get("broken") or not item.get("text"):
                continue
            refs[item.get("uri") or source.uri_of(item["path"])] = item["text"]
    return refs


def render_plots(dist: Distributions) -> dict[str, bytes]:
    """PNG plots of the distributions, kept against dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    specs = [
        ("duration", dist.duration, "segment duration (s)", np.linspace(0, 30, 31)),
        ("speaking_rate", dist.chars_per_s, "letters and digits per voiced second", np.linspace(0, 40, 41)),
        ("confidence", dist.avg_logprob, "mean token log probability", np.linspace(-2.5, 0, 26)),
        ("disagreement", dist.disagreement, "teacher vs second opinion (normalized WER/CER)", np.linspace(0, 1, 21)),
        ("dnsmos", dist.dnsmos_ovrl, "DNSMOS OVRL (1-5)", np.linspace(1, 5, 33)),
    ]
    language_plot = _language_plot(dist, plt)
    for name, values, label, bins in specs:
        if name in ("disagreement", "dnsmos") and not np.isfinite(values).any():
            continue  # not computed for this dataset: no empty figure
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        finite = np.isfinite(values)
        ax.hist(np.clip(values[dist.kept & finite], bins[0], bins[-1]), bins=bins, alpha=0.7, label="kept")
        ax.hist(np.clip(values[~dist.kept & finite], bins[0], bins[-1]), bins=bins, alpha=0.7, label="dropped")
        ax.set_xlabel(label)
        ax.set_ylabel("segments")
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        plt.close(fig)
        plots[name] = buf.getvalue()
    if language_plot is not None:
        plots["languages"] = language_plot
    return plots


def _language_plot(dist: Distributions, plt) -> bytes | None:
    """Hours per language, kept and dropped by first reason, stacked (None without labelled segments)."""
    if not dist.language.size:
        return None
    languages = sorted(set(dist.language.tolist()))
    reasons = sorted(set(dist.drop_reason[~dist.kept].tolist()))
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.45 * len(languages)), dpi=100)
    left = np.zeros(len(languages))
    for part in ["kept", *reasons]:
        mask = dist.kept if part == "kept" else (~dist.kept & (dist.drop_reason == part))
        hours = np.array([dist.duration[mask & (dist.language == lang)].sum() / 3600 for lang in languages])
        ax.barh(languages, hours, left=left, label=part if part == "kept" else f"dropped: {part}")
        left += hours
    ax.set_xlabel("hours of labelled segments")
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def report_json(report: Report) -> bytes:
    return json.dumps(asdict(report), indent=2, sort_keys=True).encode()
