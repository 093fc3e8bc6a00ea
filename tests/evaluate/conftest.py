"""Fixtures of the evaluation tests: benchmark folders in the three publishers' layouts, a tiny base with two LoRA
adapters, and stock lm-eval (HFLM + lm-eval's own task definitions, `benchmarks.common.stock_lm_eval_config`)
on the same files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from benchmarks.common import stock_lm_eval_config
from tests.utils import TINY_LLAMA

# Two subjects per benchmark: one lm-eval lists (its own description), one it does not (the pattern's).
SUBJECTS = {"ceval": ["accountant", "zz_local_exam"], "cmmlu": ["agronomy", "zz_local_exam"], "mmlu": ["anatomy"]}
HAN = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
WORDS = ["cell", "bone", "heart", "nerve", "blood", "muscle", "skin", "lung", "liver", "brain", "the", "of", "a"]


def question_rows(benchmark: str, count: int, seed: int, explained: bool = False) -> list[tuple]:
    """(question, [A, B, C, D], answer[, explanation]) rows: Chinese text for C-Eval and CMMLU, English for MMLU."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        if benchmark == "mmlu":
            return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()
        return "".join(rng.choice(HAN) for _ in range(n))

    rows = []
    for _ in range(count):
        choices = [text(rng.randint(1, 4)) for _ in range(4)]
        row = (text(rng.randint(4, 12)) + ("?" if benchmark == "mmlu" else "（ ）"), choices, rng.choice("ABCD"))
        rows.append(row + ((text(6),) if explained else ()))
    return rows


def write_benchmarks(root: Path, questions: int = 6, dev: int = 5) -> dict[str, str]:
    from component.evaluate.benchmarks import write_subject

    folders = {}
    for b, (benchmark, subjects) in enumerate(SUBJECTS.items()):
        for s, subject in enumerate(subjects):
            seed = 100 * b + 10 * s
            dev_rows = question_rows(benchmark, dev, seed, explained=benchmark == "ceval")
            write_subject(root / benchmark, benchmark, subject, dev_rows, question_rows(benchmark, questions, seed + 1))
        folders[benchmark] = str(root / benchmark)
    return folders


@pytest.fixture(scope="session")
def bench_dirs(tmp_path_factory) -> dict[str, str]:
    return write_benchmarks(tmp_path_factory.mktemp("benchmarks"))


def save_lora(base: Path, folder: Path, seed: int, targets="all-linear") -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory, demo_tokenizer) -> dict[str, str]:
    """base (a tiny Llama with room for 5-shot prompts), sft and dpo (random LoRA adapters), as folders."""
    from component.demo_assets import build_tiny_model

    root = tmp_path_factory.mktemp("eval_models")
    base = build_tiny_model(
        root / "base", config={**TINY_LLAMA, "max_position_embeddings": 2048}, tokenizer=demo_tokenizer
    )
    return {"base": str(base), "sft": save_lora(base, root / "sft", 1), "dpo": save_lora(base, root / "dpo", 2)}


def stock_samples(lm, benchmark: str, subjects: list[str], folder: str, num_fewshot: int, limit=None) -> dict:
    """Stock lm-eval: simple_evaluate(HFLM, lm-eval's task definitions): task -> (per-question [ll x4], acc)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    configs = [stock_lm_eval_config(benchmark, s, folder) for s in subjects]
    out = simple_evaluate(
        model=lm,
        tasks=configs,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
    )
    return {
        task: ([[ll for ll, _ in s["filtered_resps"]] for s in samples], out["results"][task]["acc,none"])
        for task, samples in out["samples"].items()
    }
