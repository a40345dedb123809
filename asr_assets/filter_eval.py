"""How well the filters separate good labels from bad ones, measured on real speech (``bench/filters.py``).

The real-speech corpus (``asr_assets.real_speech``) goes through the real asset graph (decode, Silero VAD, features,
the CPU teacher and its second opinion). Each labelled segment is then classed against its reference: *good* (segment
WER <= 0.2) or a *natural* teacher error (WER > 0.2). On top come *planted* bad labels of every kind a teacher
produces, each built from real parts:

- ``truncated``: a good segment's text cut at 50-75% of its words (more than a fifth missing: WER > 0.2);
- ``swapped``: another utterance's (different) text on a good segment's audio;
- ``wrong_language``: a real Spanish prompt's text on English speech;
- ``repetition``: a good text whose last words repeat 3 to 10 times (a few of the longest end with a ``length``
  finish);
- ``silence`` / ``noise`` / ``music``: a real sentence on audio without speech, measured by the same feature and
  second-opinion code as real segments. The real VAD rejects these clips (counted as ``junk_rejected_by_vad``); the
  rules are judged as if it had not, with the whole clip taken as voiced.

A planted label keeps the teacher's confidence of the segment it was built from (a confident hallucination, the hard
case) and gets the disagreement of its text with what the second model actually heard. The real rules are fitted on
the real labels (good and natural errors: what a shard holds) and applied to all; the result counts, per rule, the
good labels it would drop and the natural and planted bad ones it would catch. Precision is given over the real
labels only: the planted ones would inflate it at will.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
import numpy as np
import soundfile as sf

from asr_assets.calibrate import Audited, audit_segments, collect
from asr_assets.distill import Candidate, Rule, apply_rules, canonical_text, fit_rules
from asr_assets.records import SAMPLE_RATE
from asr_assets.second_opinion import disagreement
from asr_assets.segments import CutJob, SegmentSpan, cut_and_measure
from asr_assets.vad import SileroVad, VadParams, silero_model_path, speech_timestamps
from partitions import shard_partitions
from resources.storage import LocalStore, StorageResource
from resources.teachers import TeacherResource
from resources.teachers.base import TeacherEngine, TeacherInput, TeacherOutput, compression_ratio

GOOD_MAX_WER = 0.2
PLANTED_KINDS = ("truncated", "swapped", "wrong_language", "repetition", "silence", "noise", "music")


@dataclass(frozen=True)
class Labelled:
    """A candidate and what it really is: ``good``, ``natural`` (a teacher error), or a planted kind."""

    candidate: Candidate
    kind: str
    wer: float | None = None
    audit: Audited | None = None
    vad_rejects: bool = False


def run_pipeline(media: Path, root: Path, teacher: TeacherResource | None = None, dnsmos_fraction: float = 0.1):
    """Every partitioned asset of the graph on every shard of ``media``, in process (incremental: done work is
    skipped on a re-run)."""
    from asr_assets.definitions import all_assets

    per_shard = [a for a in all_assets if a.partitions_def is not None]
    resources = {
        "storage": StorageResource(source_uri=str(media), output_root=str(root)),
        "teacher": teacher or TeacherResource(),
    }
    config = {"ops": {"segment_features": {"config": {"dnsmos_fraction": dnsmos_fraction}}}}
    for shard in shard_partitions.get_partition_keys():
        dg.materialize(per_shard, resources=resources, partition_key=shard, run_config=config)


def natural_labels(root: Path, media: Path, references: dict[str, str]) -> tuple[list[Labelled], dict[str, str]]:
    """Every labelled segment classed against its reference, and each segment's second-opinion text."""
    source = LocalStore(media)
    refs = {source.uri_of(path): text for path, text in references.items()}
    candidates, files, second = collect(LocalStore(root), shard_partitions.get_partition_keys())
    audited = audit_segments(files, refs)
    labelled: list[Labelled] = []
    for c in candidates:
        a = audited.get(c.segment_id)
        if a is None or a.ref_words == 0:
            continue  # no reference words fall in this segment: it cannot be classed
        wer = a.errors / a.ref_words
        labelled.append(Labelled(c, "good" if wer <= GOOD_MAX_WER else "natural", round(wer, 4), a))
    return labelled, {sid: text or "" for sid, text in second.items()}


def junk_audio(kind: str, seconds: float, seed: int) -> np.ndarray:
    """Audio without speech: digital ``silence``, ``noise`` (white, -30 dBFS RMS) or ``music`` (a chord sequence
    with harmonics and note envelopes)."""
    n = round(seconds * SAMPLE_RATE)
    rng = np.random.default_rng(seed)
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "noise":
        return (rng.standard_normal(n) * 10 ** (-30 / 20)).astype(np.float32)
    if kind == "music":
        t = np.arange(n) / SAMPLE_RATE
        out = np.zeros(n)
        chords = ((261.6, 329.6, 392.0), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6), (196.0, 246.9, 293.7))
        beat = round(0.5 * SAMPLE_RATE)
        for b in range(0, n, beat):
            chord = chords[int(rng.integers(len(chords)))]
            seg = slice(b, min(n, b + beat))
            env = np.exp(-3.0 * (t[seg] - t[b]))
            for f in chord:
                for h in (1, 2, 3):
                    out[seg] += env * np.sin(2 * np.pi * f * h * t[seg]) / (h * 3)
        return (0.2 * out / np.max(np.abs(out))).astype(np.float32)
    raise ValueError(f"unknown junk kind {kind!r}")


def junk_candidates(
    work: Path, donors: list[Candidate], second: TeacherEngine, vad: VadParams | None = None
) -> list[Labelled]:
    """Text on audio without speech: each donor's text and confidence on a clip of silence, noise or music of its
    length, measured like a real segment (features, voiced time, second opinion)."""
    vad = vad or VadParams()
    silero = SileroVad(silero_model_path())
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for k, donor in enumerate(donors):
        kind = ("silence", "noise", "music")[k % 3]
        audio = junk_audio(kind, max(donor.duration_s, 1.0), seed=k)
        path = work / f"junk-{k:04d}.flac"
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
        sid = f"junk-{kind}-{k:04d}"
        span = SegmentSpan(sid, 0.0, audio.shape[0] / SAMPLE_RATE, 0.0, 0.0)
        (m,) = cut_and_measure(CutJob(sid, path, (span,), dnsmos_fraction=1.0))
        probs = silero.speech_probs(audio)
        vad_rejects = not speech_timestamps(probs, audio.shape[0], vad)
        (heard,) = second.transcribe([TeacherInput(sid, audio, donor.language)])
        heard_text = heard.text if isinstance(heard, TeacherOutput) else None
        c = replace(
            donor,
            segment_id=sid,
            duration_s=audio.shape[0] / SAMPLE_RATE,
            rms_dbfs=m.rms_dbfs,
            clip_ratio=m.clip_ratio,
            # As if the VAD had taken it all for speech (the real one rejects these clips: counted apart), so the
            # rules get no help from a voiced time of zero.
            speech_s=audio.shape[0] / SAMPLE_RATE,
            disagreement=None if heard_text is None else disagreement(donor.text, heard_text, donor.language),
            dnsmos_ovrl=m.dnsmos.ovrl if m.dnsmos is not None else None,
        )
        out.append(Labelled(c, kind, vad_rejects=vad_rejects))
    return out


def planted_text_labels(
    good: list[Candidate], second_text: dict[str, str], foreign: list[str], per_kind: int
) -> list[Labelled]:
    """Wrong texts on good segments' audio: truncated, swapped, wrong-language and repetition loops.

    The segments are picked from ``good`` in the order of their texts, not of their ids: ids hash the media's uri and
    version (path and mtime), so an id order would pick other segments, and give other figures, on every build of the
    same corpus."""
    out = []
    good = sorted(good, key=lambda c: (canonical_text(c.text), c.text, c.duration_s))
    n = len(good)
    long_enough = [c for c in good if len(c.text.split()) >= 4]

    def planted(c: Candidate, kind: str, text: str, **changes) -> Labelled:
        return Labelled(
            replace(
                c,
                segment_id=f"{c.segment_id}-{kind}",
                text=text,
                compression_ratio=compression_ratio(text),
                disagreement=disagreement(text, second_text.get(c.segment_id, ""), c.language)
                if c.disagreement is not None
                else None,
                **changes,
            ),
            kind,
        )

    for k, c in enumerate(_spread(long_enough, per_kind, offset=0)):
        # Cut anywhere from half to three quarters in: losing more than a fifth of the words is what makes a label
        # bad here (a label missing fewer is "good" by the WER <= 0.2 line every label is classed by).
        words = c.text.split()
        keep = min(len(words) - 1, max(1, int(len(words) * (0.5, 0.6, 0.7, 0.75)[k % 4])))
        out.append(planted(c, "truncated", " ".join(words[:keep])))
    for c in _spread(good, per_kind, offset=1):
        start = good.index(c) + n // 2
        other = next(
            (
                good[(start + d) % n]
                for d in range(n)
                if canonical_text(good[(start + d) % n].text) != canonical_text(c.text)
            ),
            None,
        )
        if other is not None:
            out.append(planted(c, "swapped", other.text))
    for i, c in enumerate(_spread(good, per_kind, offset=2)):
        out.append(planted(c, "wrong_language", foreign[i % len(foreign)]))
    for k, c in enumerate(_spread(long_enough, per_kind, offset=3)):
        # From a short stutter of a phrase to a runaway loop; only some runaway loops hit the token limit.
        repeats = (3, 4, 6, 10)[k % 4]
        phrase = " ".join(c.text.split()[-(2 + k % 2) :])
        loop = c.text + " " + " ".join([phrase] * (repeats - 1))
        out.append(planted(c, "repetition", loop, finish_reason="length" if repeats == 10 and k % 8 == 3 else "stop"))
    return out


def _spread(items: list, count: int, offset: int) -> list:
    """``count`` items spread over the list, starting ``offset`` in (deterministic, different per kind)."""
    if not items:
        return []
    step = max(1, len(items) // max(count, 1))
    return [items[(offset + k * step) % len(items)] for k in range(min(count, len(items)))]


def evaluate(labelled: list[Labelled], rules: list[Rule]) -> dict:
    """Fits the rules on every candidate, applies them, and counts what each rule does to good and bad labels.

    Returns:
        The bench's JSON record: ``good_segments``, ``good_dropped_ratio``, ``bad_segments``, ``bad_caught_ratio``,
        planted and natural-error catch ratios, catches per kind, and ``per_rule`` {rule: {good_dropped,
        natural_caught, planted_caught, bad_caught, precision_natural}}; also the segment WER of all and of the kept
        natural labels.
    """
    # Shard-level thresholds come from the labels a real shard holds (good and natural errors), not from the planted
    # ones, which would make up half of the shard here.
    fitted = fit_rules(rules, [item.candidate for item in labelled if item.kind in ("good", "natural")])
    per_rule = {rule.name: {"good_dropped": 0, "natural_caught": 0, "planted_caught": 0} for rule in rules}
    by_kind: dict[str, list[int]] = {}
    dropped_good: list[dict] = []
    kept_natural_wer, all_natural = [], []
    for item in labelled:
        reasons = apply_rules(fitted, item.candidate)
        tally = by_kind.setdefault(item.kind, [0, 0])
        tally[0] += bool(reasons)
        tally[1] += 1
        for name in reasons:
            what = {"good": "good_dropped", "natural": "natural_caught"}.get(item.kind, "planted_caught")
            per_rule[name][what] += 1
        if item.kind == "good" and reasons:
            dropped_good.append({"segment_id": item.candidate.segment_id, "reasons": reasons})
        if item.kind in ("good", "natural"):
            all_natural.append(item)
            if not reasons:
                kept_natural_wer.append(item)
    for counts in per_rule.values():
        counts["bad_caught"] = counts["natural_caught"] + counts["planted_caught"]
        # Precision over the labels the teacher really produced: planted ones would inflate it at will.
        fired = counts["good_dropped"] + counts["natural_caught"]
        counts["precision_natural"] = round(counts["natural_caught"] / fired, 4) if fired else None

    def ratio(kinds: set[str]) -> tuple[int, float | None]:
        total = sum(by_kind.get(k, [0, 0])[1] for k in kinds)
        caught = sum(by_kind.get(k, [0, 0])[0] for k in kinds)
        return total, (round(caught / total, 4) if total else None)

    good_n, good_dropped = by_kind.get("good", [0, 0])[1], by_kind.get("good", [0, 0])[0]
    bad_n, bad_ratio = ratio(set(by_kind) - {"good"})
    planted_n, planted_ratio = ratio(set(PLANTED_KINDS))
    natural_n, natural_ratio = ratio({"natural"})
    hours = sum(i.candidate.duration_s for i in all_natural) / 3600
    kept_hours = sum(i.candidate.duration_s for i in kept_natural_wer) / 3600
    return {
        "good_segments": good_n,
        "good_dropped": good_dropped,
        "good_dropped_ratio": round(good_dropped / good_n, 4) if good_n else None,
        "bad_segments": bad_n,
        "bad_caught_ratio": bad_ratio,
        "planted_segments": planted_n,
        "planted_caught_ratio": planted_ratio,
        "natural_errors": natural_n,
        "natural_caught_ratio": natural_ratio,
        "caught_by_kind": {k: {"caught": v[0], "total": v[1]} for k, v in sorted(by_kind.items())},
        "junk_rejected_by_vad": sum(item.vad_rejects for item in labelled),
        "natural_hours": round(hours, 4),
        "natural_kept_hours": round(kept_hours, 4),
        "segment_wer_all": _mean_wer(all_natural),
        "segment_wer_kept": _mean_wer(kept_natural_wer),
        "per_rule": per_rule,
        "good_dropped_examples": dropped_good[:10],
    }


def _mean_wer(items: list[Labelled]) -> float | None:
    """Duration-weighted mean of the segments' WER (each segment's errors count as much as its audio)."""
    if not items:
        return None
    weights = np.array([i.candidate.duration_s for i in items])
    return round(float(np.average([i.wer for i in items], weights=weights)), 4)


def load_references(corpus: Path) -> dict[str, str]:
    """Reference text by media path from a corpus' ``references.jsonl``."""
    refs = {}
    for line in (corpus / "references.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            refs[r["path"]] = r["text"]
    return refs


def summarize_kinds(labelled: list[Labelled]) -> dict[str, int]:
    return dict(sorted(Counter(item.kind for item in labelled).items()))
