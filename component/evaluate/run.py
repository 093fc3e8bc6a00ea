"""evaluate.py's recipe: read the benchmark folders, load the base and its adapters once, score every model on
every subject, then results.json, samples/, report.md, report.html and chart.png in output_dir.

Models are "base" (every adapter off) and each adapter by name, switched on one loaded base as `generate.py
compare` switches them. `--protocol lm_eval` runs lm-eval's own task definitions through `evaluator.evaluate`
with `CachedHFLM` (lm-eval's HFLM reusing each subject's prefix); `--protocol official` asks the authors' prompts
(`evaluate.official`). Everything the folders hold is read and checked before any weights load.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from component.config.choices import BENCHMARKS
from component.config.evaluation import BENCHMARK_FOLDERS, EvaluateOptions
from component.config.parser import ConfigError, closest
from component.evaluate.benchmarks import (
    LAYOUTS,
    LETTERS,
    Skip,
    Subject,
    check_subjects,
    read_benchmark,
    subject_names,
)
from component.evaluate.results import paired_differences, prediction_of, summarize

logger = logging.getLogger(__name__)

Rows = dict[str, list[dict[str, Any]]]  # task -> one row per question
KINDS = ("cached", "full_forward")  # how a question ran: on its subject's cached prefix, or a full forward


def read_subjects(options: EvaluateOptions) -> tuple[dict[str, list[Subject]], list[Skip]]:
    """The subjects of every requested benchmark folder (filtered by `subjects`), and what was skipped."""
    benchmarks = [name for name in options.task_names() if name in BENCHMARKS]
    folders = {b: getattr(options, BENCHMARK_FOLDERS[b][0]) for b in benchmarks}
    wanted = options.subject_names()
    if wanted and not benchmarks:
        raise ConfigError("'subjects' selects subjects of ceval, cmmlu, mmlu; 'tasks' names none of them")
    if wanted:
        check_subjects(wanted, {b: subject_names(b, folder) for b, folder in folders.items()})
    subjects: dict[str, list[Subject]] = {}
    skips: list[Skip] = []
    for benchmark, folder in folders.items():
        found, skipped = read_benchmark(benchmark, folder, wanted, options.num_fewshot)
        skips += skipped
        if found:
            subjects[benchmark] = found
        elif not wanted or any(name in subject_names(benchmark, folder) for name in wanted):
            reasons = "; ".join(f"{s.where}: {s.reason}" for s in skipped[:3])
            raise ConfigError(f"{LAYOUTS[benchmark].title} ({folder}): no subject left to evaluate ({reasons})")
    return subjects, skips


def load_lm_eval_tasks(names: list[str]) -> dict[str, dict[str, Any]]:
    """lm-eval tasks by name (not ceval/cmmlu/mmlu): requested name -> {leaf task name: Task}, each multiple-choice,
    its data read now, offline (from the Hugging Face cache), so a missing dataset fails before any weights load."""
    if not names:
        return {}
    from lm_eval.tasks import TaskManager

    manager = TaskManager()  # indexes every task lm-eval ships: seconds
    loaded = {}
    for name in names:
        if name not in manager.all_tasks:
            hint = closest(name, manager.all_tasks)
            raise ConfigError(f"'tasks': {name!r} is neither ceval, cmmlu, mmlu nor an lm-eval task.{hint}")
        try:
            tasks = manager.load([name])["tasks"]
        except Exception as error:  # datasets' offline errors have many types; the message says which
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"lm-eval task {name!r}: its data could not be read offline: {first_line}") from None
        other = sorted(t for t, task in tasks.items() if task.OUTPUT_TYPE != "multiple_choice")
        if other:
            raise ConfigError(f"lm-eval task {name!r}: evaluate.py runs multiple-choice tasks; {other} generate text")
        loaded[name] = tasks
    return loaded


def _lm_eval_tasks(subjects: dict[str, list[Subject]], extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every task to run, by lm-eval task name: ours built from lm-eval's definitions over our rows."""
    from lm_eval.tasks import TaskManager

    configs = [s.lm_eval_config for group in subjects.values() for s in group]
    tasks = TaskManager(include_defaults=False).load(configs)["tasks"] if configs else {}
    for loaded in extra.values():
        tasks.update(loaded)
    return tasks


def _run_lm_eval(lm, tasks: dict[str, Any], num_fewshot: int, limit: int | None) -> dict[str, list[dict]]:
    """lm-eval's evaluate() on the tasks as simple_evaluate sets them up (shots, few-shot seed): task -> samples."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.evaluator import evaluate

    for task in tasks.values():
        if task.get_config("num_fewshot") != 0:  # simple_evaluate keeps a task that fixes 0 shots at 0
            task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    output = evaluate(lm=lm, task_dict={"tasks": tasks, "groups": {}, "group_map": {}}, limit=limit, bootstrap_iters=0)
    return output["samples"]


def _lm_eval_rows(
    samples: dict[str, list[dict]], subjects: dict[str, list[Subject]], extra: dict[str, dict[str, Any]]
) -> Rows:
    rows: Rows = {}
    for benchmark, group in subjects.items():
        rows[benchmark] = []
        for subject in group:
            for sample in samples[subject.task_name]:
                values = [float(ll) for ll, _ in sample["filtered_resps"]]
                rows[benchmark].append(
                    {
                        "subject": subject.name,
                        "index": subject.questions[sample["doc_id"]].row,
                        "answer": LETTERS[sample["target"]],
                        "prediction": prediction_of(values, list(LETTERS)),
                        "loglikelihoods": values,
                        "correct": bool(sample["acc"]),
                    }
                )
    for name, tasks in extra.items():
        rows[name] = []
        for leaf in sorted(tasks):
            for sample in samples[leaf]:
                values = [float(ll) for ll, _ in sample["filtered_resps"]]
                rows[name].append(
                    {
                        "subject": leaf,
                        "index": sample["doc_id"],
                        "answer": sample["target"],
                        "prediction": prediction_of(values, list(range(len(values)))),
                        "loglikelihoods": values,
                        "correct": bool(sample["acc"]),
                    }
                )
    return rows


def _official_rows(scorer, tokenizer, subjects: dict[str, list[Subject]], options: EvaluateOptions, max_length: int):
    from component.evaluate.official import score_subject

    rows: Rows = {}
    counts: dict[str, dict[str, int]] = {}
    for benchmark, group in subjects.items():
        rows[benchmark], totals = [], dict.fromkeys(KINDS, 0)
        for subject in group:
            scored, subject_counts = score_subject(
                scorer, tokenizer, subject, options.num_fewshot, options.limit, max_length, options.prefix_cache
            )
            for kind, count in subject_counts.items():
                totals[kind] += count
            rows[benchmark] += [
                {
                    "subject": subject.name,
                    "index": s.question.row,
                    "answer": s.question.answer,
                    "prediction": s.prediction,
                    "loglikelihoods": s.log_likelihoods,
                    "correct": s.prediction == s.question.answer,
                }
                for s in scored
            ]
        counts[benchmark] = totals
    return rows, counts


def _task_counts(counts: dict[str, dict[str, int]], members: dict[str, set[str]]) -> dict[str, dict[str, int]]:
    """CachedHFLM's per-lm-eval-task counts summed per requested task (`members`: its lm-eval task names)."""
    return {
        name: {kind: sum(c.get(kind, 0) for task, c in counts.items() if task in names) for kind in KINDS}
        for name, names in members.items()
    }


def _settings(options: EvaluateOptions, max_length: int) -> dict[str, Any]:
    import lm_eval

    return {
        "model_name_or_path": options.model_name_or_path,
        "adapters": options.adapters(),
        "quantization": options.quantization,
        "protocol": options.protocol,
        "tasks": options.task_names(),
        **{key: getattr(options, key) for key, _ in BENCHMARK_FOLDERS.values()},
        "subjects": options.subject_names() or None,
        "num_fewshot": options.num_fewshot,
        "limit": options.limit,
        "max_length": max_length,
        "batch_size": options.batch_size,
        "prefix_cache": options.prefix_cache,
        "bootstrap": options.bootstrap,
        "seed": options.seed,
        "lm_eval": lm_eval.__version__,
    }


def run_evaluation(options: EvaluateOptions) -> tuple[dict[str, Any], dict[str, Path], dict[str, float]]:
    """The recipe: check and read everything, load once, score each model, write results and reports. Returns the
    results (as results.json), the paths written and each model's scoring seconds."""
    from lm_eval.models.utils import resolve_max_length

    from component.evaluate.report import write_outputs
    from component.evaluate.scorer import CachedHFLM, PrefixScorer, prefix_cache_problem
    from component.inference.compare import model_variants
    from component.inference.engine import load_weights

    subjects, skips = read_subjects(options)
    extra = load_lm_eval_tasks([n for n in options.task_names() if n not in BENCHMARKS])
    model, tokenizer = load_weights(options, padding_side="right")
    max_length = options.max_length or resolve_max_length(model.config, tokenizer)
    problem = prefix_cache_problem(model) if options.prefix_cache else None
    if problem:
        raise ConfigError(f"'prefix_cache' cannot run here: {problem}; pass --prefix_cache false")

    rows: dict[str, Rows] = {}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    seconds: dict[str, float] = {}
    if options.protocol == "official":
        scorer = PrefixScorer(model, options.batch_size)
    else:
        lm = CachedHFLM(model, tokenizer, options.batch_size, max_length, options.prefix_cache)
        tasks = _lm_eval_tasks(subjects, extra)
        members = {b: {s.task_name for s in group} for b, group in subjects.items()}
        members.update({name: set(loaded) for name, loaded in extra.items()})
    for name, switch in model_variants(model):
        started = time.time()
        with switch():
            if options.protocol == "official":
                rows[name], counts[name] = _official_rows(scorer, tokenizer, subjects, options, max_length)
            else:
                samples = _run_lm_eval(lm, tasks, options.num_fewshot, options.limit)
                rows[name] = _lm_eval_rows(samples, subjects, extra)
                counts[name] = _task_counts(lm.take_counts(), members)
        seconds[name] = time.time() - started
        questions = sum(len(r) for r in rows[name].values())
        logger.info("%s: %d questions in %.1f s (%.1f/s)", name, questions, seconds[name], questions / seconds[name])

    groups = {
        benchmark: {g: [s.name for s in group if g in s.groups] for s in group for g in s.groups}
        for benchmark, group in subjects.items()
    }
    results: dict[str, Any] = {"models": {}, "differences": {}, "skipped": [s.to_dict() for s in skips]}
    for name, by_task in rows.items():
        results["models"][name] = {}
        for task, task_rows in by_task.items():
            summary = summarize(task_rows, groups.get(task, {}))
            if options.prefix_cache and task in counts[name]:
                summary["prefix_cache"] = counts[name][task]
            results["models"][name][task] = summary
    for name in list(rows)[1:]:
        results["differences"][name] = {
            task: paired_differences(
                rows["base"][task], rows[name][task], groups.get(task, {}), options.bootstrap, options.seed
            )
            for task in rows[name]
        }
    results["settings"] = _settings(options, max_length)
    paths = write_outputs(results, rows, options.output_dir, {"seconds": seconds})
    return results, paths, seconds
