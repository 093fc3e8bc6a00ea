"""Settings of evaluate.py: which weights, which benchmarks from which folders, how many shots, which protocol.

Checked before any weights load: the folders of the named benchmarks exist, every number is in range. What the
folders hold (subjects, rows) is read and checked by `component.evaluate.benchmarks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from component.config.choices import BENCHMARKS, EVAL_PROTOCOLS
from component.config.inference import WeightsOptions, require_folder
from component.config.parser import ConfigError, choices

# Where each benchmark's folder is given, and what it holds (as extracted from the publisher's archive).
BENCHMARK_FOLDERS = {
    "ceval": ("ceval_dir", "C-Eval: dev/{subject}_dev.csv and val/{subject}_val.csv"),
    "cmmlu": ("cmmlu_dir", "CMMLU: dev/{subject}.csv and test/{subject}.csv"),
    "mmlu": ("mmlu_dir", "MMLU: dev/{subject}_dev.csv and test/{subject}_test.csv"),
}


def _help(text: str) -> dict:
    return {"help": text}


def _names(value: str | list[str] | None) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [item.strip() for item in items if item.strip()]


@dataclass
class EvaluateOptions(WeightsOptions):
    """C-Eval, CMMLU, MMLU (or any lm-eval multiple-choice task) for the base and every adapter on one loaded base."""

    tasks: str | list[str] | None = field(
        default=None,
        metadata=_help(
            "Comma-separated: ceval, cmmlu, mmlu (read from their folders) and/or lm-eval multiple-choice task "
            "names; default: each benchmark whose folder is given."
        ),
    )
    ceval_dir: str | None = field(default=None, metadata=_help("C-Eval folder (ceval-exam.zip extracted): dev/, val/."))
    cmmlu_dir: str | None = field(default=None, metadata=_help("CMMLU folder (its data/): dev/, test/."))
    mmlu_dir: str | None = field(default=None, metadata=_help("MMLU folder (data.tar extracted): dev/, test/."))
    subjects: str | list[str] | None = field(
        default=None, metadata=_help("Only these subjects (comma-separated file names, e.g. accountant,anatomy).")
    )
    num_fewshot: int = field(default=5, metadata=_help("Solved examples from dev/ before each question."))
    limit: int | None = field(default=None, metadata=_help("Evaluate only the first N questions of each subject."))
    batch_size: int = field(default=8, metadata=_help("Questions run together."))
    max_length: int | None = field(
        default=None, metadata=_help("Longest prompt in tokens; default: the model config's (as lm-eval decides).")
    )
    protocol: str = field(
        default="lm_eval",
        metadata=choices(
            *EVAL_PROTOCOLS,
            help="lm_eval (lm-evaluation-harness' task definitions) or official (the benchmark authors' prompts "
            "and answer-letter scoring).",
        ),
    )
    prefix_cache: bool = field(
        default=True, metadata=_help("Reuse each subject's few-shot prefix (its KV cache) across its questions.")
    )
    bootstrap: int = field(default=1000, metadata=_help("Resamples for the 95% intervals of each adapter vs base."))
    seed: int = field(default=1234, metadata=_help("Seed of the bootstrap resamples."))
    output_dir: str = field(default="output/evaluate", metadata=_help("Where results.json, samples/, reports go."))

    def task_names(self) -> list[str]:
        """The requested tasks in order; by default each benchmark whose folder is given."""
        names = _names(self.tasks) or [b for b in BENCHMARKS if getattr(self, BENCHMARK_FOLDERS[b][0])]
        if len(set(names)) < len(names):
            raise ConfigError(f"'tasks' names a task twice: {names}")
        return names

    def subject_names(self) -> list[str]:
        return _names(self.subjects)

    def validate(self) -> None:
        super().validate()
        names = self.task_names()
        if not names:
            raise ConfigError(
                "nothing to evaluate: give 'tasks' (ceval, cmmlu, mmlu or lm-eval task names) and/or "
                "'ceval_dir', 'cmmlu_dir', 'mmlu_dir'"
            )
        for benchmark, (key, layout) in BENCHMARK_FOLDERS.items():
            folder = getattr(self, key)
            if benchmark in names and not folder:
                raise ConfigError(f"'tasks' names {benchmark}: give '{key}' (the {layout} folder)")
            require_folder(key, folder, layout)
        if self.protocol == "official" and any(name not in BENCHMARKS for name in names):
            others = [name for name in names if name not in BENCHMARKS]
            raise ConfigError(f"'protocol' official has the authors' prompts of ceval, cmmlu, mmlu only, not {others}")
        for key, low in (("num_fewshot", 0), ("batch_size", 1), ("limit", 1), ("max_length", 2), ("bootstrap", 0)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise ConfigError(f"'{key}' must be at least {low}, got {value}")
