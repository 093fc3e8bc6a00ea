"""Scores and intervals: micro and macro accuracy per task and group; the paired, subject-stratified bootstrap
against the normal approximation of the same stratified difference."""

from __future__ import annotations

import math
import random

import pytest


def rows_of(correct: dict[str, list[bool]]) -> list[dict]:
    return [{"subject": s, "index": i, "correct": c} for s, values in correct.items() for i, c in enumerate(values)]


def test_micro_macro_and_groups():
    from component.evaluate.results import summarize

    rows = rows_of({"a": [True, True, False, False], "b": [True], "c": [False, False]})
    summary = summarize(rows, {"G": ["a", "b"], "H": ["c", "missing"], "empty": ["missing"]})
    assert summary["acc"] == pytest.approx(3 / 7) and summary["n"] == 7
    assert summary["acc_macro"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert summary["subjects"] == {"a": {"acc": 0.5, "n": 4}, "b": {"acc": 1.0, "n": 1}, "c": {"acc": 0.0, "n": 2}}
    assert summary["groups"] == {
        "G": {"acc": pytest.approx(0.6), "acc_macro": pytest.approx(0.75), "n": 5},
        "H": {"acc": 0.0, "acc_macro": 0.0, "n": 2},
    }


def test_paired_bootstrap_matches_the_normal_approximation():
    """Two subjects of 600 and 300 questions: the 95% interval of the micro difference is close to delta +- 1.96 SE,
    SE from the per-subject variances of the paired differences (stratified sampling)."""
    from component.evaluate.results import paired_differences

    rng = random.Random(0)
    base = {"x": [rng.random() < 0.5 for _ in range(600)], "y": [rng.random() < 0.3 for _ in range(300)]}
    other = {s: [c if rng.random() < 0.8 else rng.random() < 0.7 for c in values] for s, values in base.items()}
    result = paired_differences(rows_of(base), rows_of(other), {"only_y": ["y"]}, resamples=4000, seed=7)

    total = sum(len(v) for v in base.values())
    diffs = {s: [int(o) - int(b) for o, b in zip(other[s], base[s])] for s in base}
    delta = sum(sum(d) for d in diffs.values()) / total
    variance = sum((len(d) / total) ** 2 * _variance(d) / len(d) for d in diffs.values())
    acc = result["acc"]
    assert acc["delta"] == pytest.approx(delta)
    assert acc["low"] == pytest.approx(delta - 1.96 * math.sqrt(variance), abs=0.006)
    assert acc["high"] == pytest.approx(delta + 1.96 * math.sqrt(variance), abs=0.006)
    y = diffs["y"]
    group = result["groups"]["only_y"]["acc"]
    assert group["delta"] == pytest.approx(sum(y) / len(y))
    assert group["high"] - group["low"] == pytest.approx(2 * 1.96 * math.sqrt(_variance(y) / len(y)), rel=0.1)
    macro = result["acc_macro"]
    assert macro["delta"] == pytest.approx((sum(diffs["x"]) / 600 + sum(y) / 300) / 2)
    assert macro["low"] < macro["delta"] < macro["high"]


def _variance(values: list[int]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def test_seeded_same_questions_no_difference_and_no_resamples():
    from component.evaluate.results import paired_differences

    base = rows_of({"x": [True, False, True, False, True], "y": [False, True]})
    other = rows_of({"x": [True, True, True, False, False], "y": [True, True]})
    first = paired_differences(base, other, {}, 500, 3)
    assert first == paired_differences(base, other, {}, 500, 3)
    same = paired_differences(base, base, {}, 500, 3)
    assert same["acc"] == {"delta": 0.0, "low": 0.0, "high": 0.0}
    none = paired_differences(base, other, {}, 0, 3)
    assert none["acc"] == {"delta": pytest.approx(1 / 7), "low": None, "high": None}
