"""Calibrated filter thresholds: a threshold card fitted on a small audit set (``threshold_card``).

Given reference texts for some files, every labelled segment of those files gets a measured error count, and the
thresholds of the three rules that trade hours for label quality (``low_confidence``, ``disagreement``,
``speaking_rate_outlier``) are searched on a fixed grid: the card keeps the setting with the most hours kept (over
every labelled segment, audited or not) whose kept audited labels have a WER at or under the target. The other rules
keep their configured parameters. Everything is deterministic: the same tables, audit and target give the same card.

References are per file; a file's reference is split over its segments by aligning it with the segments' teacher
texts in order (``segment_references``), so a word is charged to the segment that said it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import jiwer
import numpy as np
import pyarrow.compute as pc

from asr_assets import dedup, layout
from asr_assets.distill import (
    FILTER_VERSION,
    Candidate,
    Disagreement,
    LowConfidence,
    SpeakingRateOutlier,
    apply_rules,
    build_rules,
    canonical_text,
    fit_rules,
    shard_candidates,
)
from asr_assets.languages import error_metric
from asr_assets.records import FEATURE_SCHEMA, SEGMENT_SCHEMA
from asr_assets.stages import read_transcripts
from resources.storage import ObjectStore, read_table

CARD_VERSION = "threshold-card-v1"
CARD_KEY = "report/threshold_card.json"
# The searched thresholds. "Off" is the first value of each list (a threshold nothing crosses).
CONFIDENCE_GRID = (-99.0, -1.5, -1.2, -1.0, -0.9, -0.8, -0.7, -0.6, -0.5, -0.4, -0.3)
DISAGREEMENT_GRID = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0)
RATE_FENCE_GRID = (99.0, 3.0, 2.0, 1.5, 1.0, 0.75)
# The build_rules arguments a card sets (low_confidence, disagreement and speaking_rate_outlier thresholds).
CARD_FIELDS = ("min_avg_logprob", "max_disagreement", "rate_fence_k")


def _units(text: str, language: str) -> list[str]:
    """Words of the normalized text, or its characters for scripts written without spaces."""
    norm = canonical_text(text, language)
    return list(norm.replace(" ", "")) if error_metric(language) == "cer" else norm.split()


def label_errors(reference: str, hypothesis: str, language: str = "en") -> tuple[int, int]:
    """Edit operations (substitutions + deletions + insertions) and reference length, in words (characters for
    unspaced scripts), after normalization."""
    ref, hyp = _units(reference, language), _units(hypothesis, language)
    if not ref:
        return len(hyp), 0
    if not hyp:
        return len(ref), len(ref)
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return out.substitutions + out.deletions + out.insertions, len(ref)


def label_error_rate(reference: str, hypothesis: str, language: str = "en") -> tuple[str, float | None]:
    """The label error rate of ``hypothesis`` against ``reference`` and its name: ``("cer", rate)`` for languages
    measured in characters (zh, ja, ko, th: ``languages.error_metric``), ``("wer", rate)`` for the others; the rate
    is None when the reference is empty. Every reported label error rate goes through this (or sums
    ``label_errors`` of the same language)."""
    errors, units = label_errors(reference, hypothesis, language)
    return error_metric(language), (errors / units if units else None)


def segment_references(reference: str, hypotheses: list[str], language: str = "en") -> list[str]:
    """Splits a file's reference over its segments (in time order) by aligning it with their concatenated texts.

    Each reference word goes to the segment of the hypothesis word it is aligned with; a deleted word goes to the
    segment of the hypothesis word before it (the first segment at the start).
    """
    joiner = "" if error_metric(language) == "cer" else " "
    ref = _units(reference, language)
    owner: list[int] = []
    hyp: list[str] = []
    for k, text in enumerate(hypotheses):
        units = _units(text or "", language)
        hyp.extend(units)
        owner.extend([k] * len(units))
    pieces: list[list[str]] = [[] for _ in hypotheses]
    if not hypotheses or not ref:
        return [joiner.join(p) for p in pieces]
    if not hyp:
        pieces[0] = ref
        return [joiner.join(p) for p in pieces]
    alignment = jiwer.process_words(" ".join(ref), " ".join(hyp)).alignments[0]
    for chunk in alignment:
        if chunk.type == "insert":
            continue
        for i in range(chunk.ref_start_idx, chunk.ref_end_idx):
            if chunk.type == "delete":
                j = chunk.hyp_start_idx - 1
            else:
                j = min(chunk.hyp_start_idx + (i - chunk.ref_start_idx), chunk.hyp_end_idx - 1)
            pieces[owner[max(j, 0)]].append(ref[i])
    return [joiner.join(p) for p in pieces]


def collect(
    out: ObjectStore, shards: list[str]
) -> tuple[list[Candidate], dict[str, list[tuple[str, str, str]]], dict[str, str | None]]:
    """Every labelled segment of the shards as a rule candidate; per source uri its labelled segments in time order
    as (segment id, teacher text, language); and each segment's second-opinion text (None without one)."""
    candidates: list[Candidate] = []
    files: dict[str, list[tuple[str, str, str]]] = {}
    second: dict[str, str | None] = {}
    for shard in shards:
        transcripts = read_transcripts(out, shard)
        # Known copies skipped before the teacher have no label to fit thresholds on.
        transcripts = transcripts.filter(pc.invert(pc.starts_with(transcripts["finish_reason"], dedup.SKIPPED_FINISH)))
        if not transcripts.num_rows:
            continue
        features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA)
        segments = read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA)
        index = layout.read_index(out, shard)
        uris = dict(zip(index["media_id"].to_pylist(), index["uri"].to_pylist(), strict=True))
        labelled, _, segs, cands = shard_candidates(transcripts, features, segments)
        candidates.extend(cands)
        for t in sorted(labelled, key=lambda t: (t["media_id"], segs[t["segment_id"]]["index"])):
            files.setdefault(uris[t["media_id"]], []).append((t["segment_id"], t["text"], t["language"]))
            second[t["segment_id"]] = t.get("second_text")
    return candidates, files, second


@dataclass(frozen=True)
class Audited:
    """A labelled segment with a measured error: errors and reference length in words, and the file it is from."""

    errors: int
    ref_words: int
    file: str


def audit_segments(files: dict[str, list[tuple[str, str, str]]], references: dict[str, str]) -> dict[str, Audited]:
    """Measured errors of every labelled segment of the referenced files.

    Args:
        files: per source uri, its labelled segments in time order as (segment id, teacher text, language).
        references: reference text per source uri (files without one are skipped).
    """
    audited = {}
    for uri, segs in sorted(files.items()):
        if uri not in references or not segs:
            continue
        language = segs[0][2]
        refs = segment_references(references[uri], [text for _, text, _ in segs], language)
        for (segment_id, text, lang), ref in zip(segs, refs, strict=True):
            errors, words = label_errors(ref, text, lang)
            audited[segment_id] = Audited(errors, words, uri)
    return audited


def _wer(errors: np.ndarray, words: np.ndarray, mask: np.ndarray) -> float | None:
    total = int(words[mask].sum())
    return float(errors[mask].sum() / total) if total else None


def _bootstrap_ci(
    errors: np.ndarray, words: np.ndarray, files: np.ndarray, mask: np.ndarray, resamples: int = 1000
) -> list[float] | None:
    """95% interval of the kept WER, resampling files (segments of one file are not independent); fixed seed."""
    names = np.unique(files[mask])
    if names.size == 0:
        return None
    per_file = np.array([[errors[mask & (files == n)].sum(), words[mask & (files == n)].sum()] for n in names])
    rng = np.random.default_rng(0)
    picks = rng.integers(0, names.size, size=(resamples, names.size))
    sums = per_file[picks].sum(axis=1)
    rates = sums[:, 0] / np.maximum(sums[:, 1], 1)
    return [round(float(np.quantile(rates, 0.025)), 4), round(float(np.quantile(rates, 0.975)), 4)]


def fit_card(
    candidates: list[Candidate],
    audited: dict[str, Audited],
    base_params: dict,
    target_wer: float = 0.05,
) -> dict:
    """The threshold card: the grid setting with the most kept hours whose kept audited WER <= ``target_wer``.

    Args:
        candidates: every labelled segment in scope (the hours are counted over all of them).
        audited: measured errors of the segments that have a reference.
        base_params: ``build_rules`` arguments for the rules the card does not set.
        target_wer: the kept labels' WER to stay under.

    Returns:
        The card as a JSON-ready dict (``thresholds``, ``effect``, ``target_met``, lineage).
    """
    seconds = np.array([c.duration_s for c in candidates])
    logprob = np.array([c.avg_logprob if c.avg_logprob is not None else -np.inf for c in candidates])
    disagreement = np.array([c.disagreement if c.disagreement is not None else -1.0 for c in candidates])
    is_audited = np.array([c.segment_id in audited for c in candidates], bool)
    errors = np.array([audited[c.segment_id].errors if c.segment_id in audited else 0 for c in candidates])
    words = np.array([audited[c.segment_id].ref_words if c.segment_id in audited else 0 for c in candidates])
    files = np.array([audited[c.segment_id].file if c.segment_id in audited else "" for c in candidates])

    # Every rule the card does not set, applied once; each searched rule becomes one boolean array per threshold.
    searched = (LowConfidence.name, Disagreement.name, SpeakingRateOutlier.name)
    rules = fit_rules(build_rules(**base_params), candidates)
    others_keep = np.array([not [n for n in apply_rules(rules, c) if n not in searched] for c in candidates], bool)
    rate_keep = {}
    for k in RATE_FENCE_GRID:
        (fence,) = fit_rules([replace(_rule(rules, SpeakingRateOutlier), k=k, fences=())], candidates)
        rate_keep[k] = np.array([not fence.drops(c) for c in candidates], bool)

    wer_all = _wer(errors, words, is_audited)
    best = None
    for t_conf in CONFIDENCE_GRID:
        conf_keep = logprob >= t_conf
        for t_dis in DISAGREEMENT_GRID:
            base = others_keep & conf_keep & (disagreement <= t_dis + 1e-6)  # as Disagreement.drops
            for k in RATE_FENCE_GRID:
                kept = base & rate_keep[k]
                wer = _wer(errors, words, kept & is_audited)
                if wer is None:
                    continue
                hours = float(seconds[kept].sum()) / 3600
                met = wer <= target_wer + 1e-12
                # Most hours among settings meeting the target; if none does, the lowest WER. Ties keep grid order.
                key = (met, hours if met else -wer, -wer if met else hours)
                if best is None or key > best[0]:
                    best = (key, (t_conf, t_dis, k), kept, met)
    if best is None:
        raise ValueError("threshold_card: no audited segment has a reference word; check the audit file's uris")
    _, (t_conf, t_dis, k), kept, met = best
    return {
        "version": CARD_VERSION,
        "filter_version": FILTER_VERSION,
        "target_wer": target_wer,
        "target_met": bool(met),
        "thresholds": {"min_avg_logprob": t_conf, "max_disagreement": t_dis, "rate_fence_k": k},
        "base_params": dict(sorted(base_params.items())),
        "effect": {
            "segments": len(candidates),
            "audited_segments": int(is_audited.sum()),
            "audited_files": int(np.unique(files[is_audited]).size),
            "hours_all": round(float(seconds.sum()) / 3600, 5),
            "hours_kept": round(float(seconds[kept].sum()) / 3600, 5),
            "kept_segments": int(kept.sum()),
            "wer_all": None if wer_all is None else round(wer_all, 4),
            "wer_kept": round(_wer(errors, words, kept & is_audited), 4),
            "wer_kept_ci95": _bootstrap_ci(errors, words, files, kept & is_audited),
        },
        "inputs_sha": _inputs_sha(candidates, audited),
    }


def _rule(rules: list, cls: type) -> object:
    return next(r for r in rules if isinstance(r, cls))


def _inputs_sha(candidates: list[Candidate], audited: dict[str, Audited]) -> str:
    h = hashlib.sha256()
    for c in sorted(candidates, key=lambda c: c.segment_id):
        h.update(json.dumps([c.segment_id, c.text, c.avg_logprob, c.disagreement, c.duration_s]).encode())
    for segment_id in sorted(audited):
        h.update(json.dumps([segment_id, audited[segment_id].errors, audited[segment_id].ref_words]).encode())
    return h.hexdigest()[:16]


def card_overrides(card: dict) -> dict:
    """The ``distilled_dataset`` config fields a card sets.

    Raises:
        ValueError: the object is not a threshold card of this version.
    """
    if card.get("version") != CARD_VERSION or set(card.get("thresholds", {})) != set(CARD_FIELDS):
        raise ValueError(f"not a {CARD_VERSION} threshold card (fields: {sorted(card)})")
    return dict(card["thresholds"])
