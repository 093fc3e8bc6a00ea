"""From per-question rows to scores: accuracy per subject, group and benchmark, and each adapter's difference
from the base with a 95% interval (paired bootstrap over questions, stratified by subject, seeded).

A row is one question as one model answered it: {subject, index, answer, prediction, loglikelihoods, correct}.
Every model answers the same questions, so rows pair up by (subject, index).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

INTERVAL = (2.5, 97.5)


def _by_subject(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["subject"]].append(row)
    return dict(sorted(grouped.items()))


def _scores(correct: dict[str, list[bool]], subjects: list[str]) -> dict[str, Any]:
    """Micro accuracy (over questions), macro accuracy (mean of the subjects') and the question count."""
    counts = [len(correct[s]) for s in subjects]
    hits = [sum(correct[s]) for s in subjects]
    total = sum(counts)
    return {
        "acc": sum(hits) / total if total else None,
        "acc_macro": float(np.mean([h / n for h, n in zip(hits, counts)])) if subjects else None,
        "n": total,
    }


def summarize(rows: list[dict[str, Any]], groups: dict[str, list[str]]) -> dict[str, Any]:
    """One model's scores on one task: overall, per subject, and per subject group (`groups`: group -> subjects)."""
    correct = {
        subject: [bool(r["correct"]) for r in subject_rows] for subject, subject_rows in _by_subject(rows).items()
    }
    summary = _scores(correct, list(correct))
    summary["subjects"] = {s: {"acc": sum(c) / len(c), "n": len(c)} for s, c in correct.items()}
    summary["groups"] = {
        group: _scores(correct, present)
        for group, members in groups.items()
        for present in [[s for s in members if s in correct]]
        if present
    }
    return summary


def paired_differences(
    base: list[dict[str, Any]], other: list[dict[str, Any]], groups: dict[str, list[str]], resamples: int, seed: int
) -> dict[str, Any]:
    """other minus base, on acc and acc_macro, overall and per group: {"delta", "low", "high"} (low/high None when
    `resamples` is 0). Resampling draws each subject's questions with replacement (the same draws for every
    adapter, from `seed`), so an interval that holds 0 is a difference the questions cannot tell from noise."""
    base_by, other_by = _by_subject(base), _by_subject(other)
    diffs = {}
    for subject, rows in base_by.items():
        mine = {r["index"]: bool(r["correct"]) for r in other_by.get(subject, [])}
        diffs[subject] = np.array([mine[r["index"]] - bool(r["correct"]) for r in rows], dtype=np.float64)
    rng = np.random.default_rng(seed)
    # Resampled sum of differences per subject: [resamples] each.
    sums = {s: d[rng.integers(0, len(d), size=(resamples, len(d)))].sum(axis=1) for s, d in diffs.items()}

    def interval(subjects: list[str]) -> dict[str, Any]:
        n = np.array([len(diffs[s]) for s in subjects], dtype=np.float64)
        totals = np.array([diffs[s].sum() for s in subjects])
        result = {"acc": {"delta": float(totals.sum() / n.sum())}, "acc_macro": {"delta": float(np.mean(totals / n))}}
        if resamples:
            drawn = np.stack([sums[s] for s in subjects])  # [subjects, resamples]
            for key, values in (("acc", drawn.sum(axis=0) / n.sum()), ("acc_macro", (drawn / n[:, None]).mean(axis=0))):
                low, high = np.percentile(values, INTERVAL)
                result[key].update(low=float(low), high=float(high))
        else:
            for key in result:
                result[key].update(low=None, high=None)
        return result

    out = interval(list(diffs))
    out["groups"] = {
        group: interval(present)
        for group, members in groups.items()
        for present in [[s for s in members if s in diffs]]
        if present
    }
    return out


def prediction_of(log_likelihoods: list[float], labels: list[Any]) -> Any:
    """The label of the highest log-likelihood; the first on a tie, as lm-eval's argmax."""
    return labels[int(np.argmax(log_likelihoods))]
