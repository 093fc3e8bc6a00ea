"""The data pipeline every recipe shares: read, mix, cap, split, tokenize once (datasets.map), cache, report.

What is read and how a row is tokenized are the recipe's (`supervised`, `pairwise`); this module does the rest.

The tokenized result is cached on disk under a key made of the tokenizer files, the data files (path,
size, mtime) and every setting that changes the tokens, so a second run loads it in seconds. Under
torchrun the main process builds the cache and the others load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, load_from_disk

from component.config.errors import InputError
from component.config.training import FinetuneArguments
from component.data.readers import SourceReport
from component.data.template import IGNORE_INDEX, Template

logger = logging.getLogger(__name__)

# Bump when tokenization code changes in a way that changes cached tokens.
CACHE_VERSION = "1"
PREVIEW_EXAMPLES = 20


class NoDataError(InputError):
    """Every example was dropped; the data report (written first) says why."""


def skip_summary(reports: list[SourceReport]) -> str:
    """'kept 0 of 12 (skipped: empty_reply=10, truncated_to_nothing=2)' over all sources."""
    read = sum(r.read for r in reports)
    kept = sum(r.kept for r in reports)
    skipped: dict[str, int] = {}
    for report in reports:
        for reason, count in report.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return f"kept {kept} of {read} records" + (f" (skipped: {reasons})" if reasons else "")


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    report: dict[str, Any]
    cache_path: Path | None = None
    from_cache: bool = False


@dataclass
class RawSplit:
    """Canonical rows (dicts) with the index of the source file each came from."""

    rows: list[dict] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)


def file_fingerprint(path: str) -> dict:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's own files (and class), so a different vocabulary never reuses a cache."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    files = sorted(p for p in folder.glob("*") if p.is_file() and _is_tokenizer_file(p.name)) if folder.is_dir() else []
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    if not files:  # built in memory: fall back to its vocabulary and special tokens
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    digest.update(json.dumps(tokenizer.all_special_tokens).encode())
    return digest.hexdigest()[:16]


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template"))


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLM_TRAINING_CACHE", Path.home() / ".cache" / "llm_training")) / "datasets"


def deterministic_sample(items: list, limit: int | None, seed: int) -> tuple[list, int]:
    """A seeded random subset of at most `limit` items (order shuffled) and how many were left out."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    return [items[i] for i in order], len(items) - len(order)


def _count(report: SourceReport, reason: str, number: int) -> None:
    if number:
        report.skipped[reason] = report.skipped.get(reason, 0) + number
        report.kept -= number


def read_split(
    specs: list[dict], args: FinetuneArguments, seed: int, reader: Callable
) -> tuple[RawSplit, list[SourceReport]]:
    """Read every file of one split, apply per-file caps, mix and shuffle deterministically."""
    split = RawSplit()
    reports = []
    for index, spec in enumerate(specs):
        rows, report = reader(spec, args)
        rows, left_out = deterministic_sample(rows, spec["max_samples"], seed + index)
        _count(report, "max_samples", left_out)
        split.rows += rows
        split.sources += [index] * len(rows)
        reports.append(report)
    order = list(range(len(split.rows)))
    random.Random(seed).shuffle(order)
    split.rows = [split.rows[i] for i in order]
    split.sources = [split.sources[i] for i in order]
    return split, reports


def tokenize_split(
    split: RawSplit,
    reports: list[SourceReport],
    tokenize: Callable,
    num_proc: int | None,
    empty_reason: str,
    desc: str,
) -> Dataset:
    """Tokenize through `datasets.map`, then drop (and count per source) what has no label left."""
    dataset = Dataset.from_dict({"source": split.sources, "row": split.rows}).flatten()
    dataset = dataset.rename_columns({c: c[len("row.") :] for c in dataset.column_names if c.startswith("row.")})
    columns = [c for c in dataset.column_names if c != "source"]
    num_proc = num_proc if num_proc and len(dataset) >= 1000 * num_proc else None
    dataset = dataset.map(tokenize, batched=True, num_proc=num_proc, remove_columns=columns, desc=desc)
    sources = _column(dataset, "source").to_numpy().astype(np.int64)
    lengths = _column(dataset, "length").to_numpy().astype(np.int64)
    truncated = _column(dataset, "truncated").to_numpy(zero_copy_only=False).astype(bool)
    empty = lengths == 0
    for index, report in enumerate(reports):
        mine = sources == index
        _count(report, empty_reason, int(np.sum(empty & mine)))
        report.truncated += int(np.sum(truncated & mine & ~empty))
    if empty.any():
        dataset = dataset.select(np.flatnonzero(~empty))
    return dataset.remove_columns(["source", "truncated"])


def _length_stats(lengths: np.ndarray) -> dict[str, int]:
    if len(lengths) == 0:
        return {"min": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="nearest")
    return {"min": int(lengths.min()), "p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lengths.max())}


def _column(dataset: Dataset, name: str) -> pa.Array:
    """One column as a single Arrow array (a select() applied): read at once, not row by row through Python."""
    column = dataset.with_format("arrow")[name]
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def label_token_count(dataset: Dataset, label_columns: tuple[str, ...] = ("labels",)) -> int:
    """Label tokens trained on: labels[1:] != -100 over all examples (all labels minus each example's first)."""
    total = 0
    for column in label_columns:
        labels = _column(dataset, column)
        values = labels.flatten().to_numpy()
        firsts = pc.list_element(labels.filter(pc.greater(pc.list_value_length(labels), 0)), 0).to_numpy()
        total += int(np.sum(values != IGNORE_INDEX)) - int(np.sum(firsts != IGNORE_INDEX))
    return total


def build_report(
    train: Dataset,
    eval_dataset: Dataset | None,
    train_reports,
    eval_reports,
    label_columns: tuple[str, ...] = ("labels",),
) -> dict[str, Any]:
    """Counts and token statistics; `label_columns=()` (reward pairs: no labels) leaves the label keys out."""
    lengths = _column(train, "length").to_numpy().astype(np.int64)
    report = {
        "sources": [r.to_dict() for r in train_reports],
        "eval_sources": [r.to_dict() for r in eval_reports],
        "examples": len(train),
        "eval_examples": len(eval_dataset) if eval_dataset is not None else 0,
        "tokens": _length_stats(lengths),
        "total_tokens": int(lengths.sum()),
    }
    if label_columns:
        label_tokens = label_token_count(train, label_columns)
        report["label_tokens"] = label_tokens
        report["label_token_fraction"] = round(label_tokens / max(int(lengths.sum()), 1), 4)
    return report


def build_splits(args: FinetuneArguments, seed: int, reader: Callable, tokenize: Callable, empty_reason: str):
    """Read, cap, split and tokenize train (and eval) data; returns datasets and per-source reports."""
    train_split, train_reports = read_split(args.train_files, args, seed, reader)
    if args.max_samples is not None and len(train_split.rows) > args.max_samples:
        for source in train_split.sources[args.max_samples :]:
            _count(train_reports[source], "max_samples", 1)
        train_split.rows = train_split.rows[: args.max_samples]
        train_split.sources = train_split.sources[: args.max_samples]
    eval_split, eval_reports = RawSplit(), []
    if args.eval_file:
        eval_split, eval_reports = read_split(args.eval_files, args, seed, reader)
    elif args.test_size > 0:
        held_out = max(1, round(len(train_split.rows) * args.test_size))
        eval_split = RawSplit(train_split.rows[:held_out], train_split.sources[:held_out])
        train_split = RawSplit(train_split.rows[held_out:], train_split.sources[held_out:])
        eval_reports = train_reports  # held-out rows still belong to their source file
    if not train_split.rows:
        raise _no_data("after reading", train_reports, eval_reports)
    train = tokenize_split(train_split, train_reports, tokenize, args.num_proc, empty_reason, "Tokenizing train")
    if len(train) == 0:
        raise _no_data("after tokenizing", train_reports, [] if eval_reports is train_reports else eval_reports)
    eval_dataset = None
    if eval_split.rows:
        eval_dataset = tokenize_split(
            eval_split, eval_reports, tokenize, args.num_proc, empty_reason, "Tokenizing eval"
        )
    if eval_reports is train_reports:
        eval_reports = []
    return train, eval_dataset, train_reports, eval_reports


def _no_data(stage: str, train_reports: list[SourceReport], eval_reports: list[SourceReport]) -> NoDataError:
    error = NoDataError(f"no training examples left {stage}: {skip_summary(train_reports)}")
    error.report = {
        "sources": [r.to_dict() for r in train_reports],
        "eval_sources": [r.to_dict() for r in eval_reports],
        "examples": 0,
        "eval_examples": 0,
    }
    return error


def cache_settings(
    kind: str, args: FinetuneArguments, template: Template, training_args, keys: tuple[str, ...], **versions: str
) -> dict[str, Any]:
    """Everything that changes the tokens of a recipe's data: the cache key (and settings.json) of its cache."""
    return {
        "kind": kind,
        "version": CACHE_VERSION,
        **versions,
        "tokenizer": tokenizer_fingerprint(template.tokenizer),
        "template": template.name,
        "train_files": [{**s, **file_fingerprint(s["path"])} for s in args.train_files],
        "eval_files": [{**s, **file_fingerprint(s["path"])} for s in args.eval_files],
        "seed": training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        **{key: getattr(args, key) for key in keys},
    }


def prepare_cached(
    settings: dict,
    args: FinetuneArguments,
    training_args,
    build: Callable,
    label_columns: tuple[str, ...] = ("labels",),
) -> PreparedData:
    cache_root = Path(args.data_cache_dir) if args.data_cache_dir else default_cache_dir()
    cache_path = cache_root / cache_key(settings)
    with training_args.main_process_first(desc="dataset tokenization"):
        done = cache_path / "report.json"
        if done.is_file() and not args.overwrite_cache:
            logger.info("Loading tokenized data from cache %s", cache_path)
            train = load_from_disk(str(cache_path / "train"))
            eval_dataset = load_from_disk(str(cache_path / "eval")) if (cache_path / "eval").is_dir() else None
            report = json.loads(done.read_text(encoding="utf-8"))
            return PreparedData(train, eval_dataset, report, cache_path, from_cache=True)
        try:
            train, eval_dataset, train_reports, eval_reports = build()
        except NoDataError as error:  # the report first, so the message can point at its skip counts
            if training_args.process_index == 0:
                out = Path(training_args.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                text = json.dumps(error.report, indent=2, ensure_ascii=False) + "\n"
                (out / "data_report.json").write_text(text, encoding="utf-8")
            raise NoDataError(f"{error}; see {training_args.output_dir}/data_report.json") from None
        report = build_report(train, eval_dataset, train_reports, eval_reports, label_columns)
        if training_args.process_index == 0 or not cache_path.exists():
            tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}")
            train.save_to_disk(str(tmp / "train"))
            if eval_dataset is not None:
                eval_dataset.save_to_disk(str(tmp / "eval"))
            (tmp / "settings.json").write_text(json.dumps(settings, indent=2, default=str), encoding="utf-8")
            (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
            if cache_path.exists():  # overwrite_cache: replace the old entry whole
                shutil.rmtree(cache_path)
            os.replace(tmp, cache_path)
        train = load_from_disk(str(cache_path / "train"))
        eval_dataset = load_from_disk(str(cache_path / "eval")) if (cache_path / "eval").is_dir() else None
        return PreparedData(train, eval_dataset, report, cache_path, from_cache=False)


def write_data_report(data: PreparedData, output_dir: str, preview_columns: tuple[str, ...]) -> None:
    """data_report.json and data_preview.jsonl (the first tokenized training examples)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(json.dumps(data.report, indent=2, ensure_ascii=False) + "\n", "utf-8")
    preview = data.train.select(range(min(PREVIEW_EXAMPLES, len(data.train)))).select_columns(list(preview_columns))
    with open(out / "data_preview.jsonl", "w", encoding="utf-8") as handle:
        for row in preview:
            handle.write(json.dumps(row) + "\n")
