"""evaluate.py against stock lm-eval: every question's four log-likelihoods equal those of lm-eval's HFLM running
lm-eval's own task definitions on the same files (within 1e-4), with the prefix cache and without it, for the base
and for an adapter (stock: `HFLM(peft=PATH)`), in all three layouts; Baichuan (ALiBi, RoPE), Qwen2 and a 4-bit
base too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.evaluate.conftest import SUBJECTS, save_lora, stock_samples, write_benchmarks
from tests.utils import TINY_LLAMA

TOLERANCE = 1e-4
TASK_NAMES = {"ceval": "ceval-valid_{}", "cmmlu": "cmmlu_{}", "mmlu": "mmlu_{}"}


def run_ours(tmp_path: Path, base: str, folders: dict[str, str], adapters: dict[str, str], **settings):
    from component.config.evaluation import EvaluateOptions
    from component.evaluate.run import run_evaluation

    options = EvaluateOptions(
        model_name_or_path=base,
        adapter=[f"{name}={path}" for name, path in adapters.items()] or None,
        **{f"{benchmark}_dir": folder for benchmark, folder in folders.items()},
        output_dir=str(tmp_path / "out"),
        batch_size=3,
        bootstrap=200,
        **settings,
    )
    options.validate()
    results, paths, _ = run_evaluation(options)
    samples = {}
    for model in results["models"]:
        samples[model] = {}
        for file in sorted((paths["samples"] / model).glob("*.jsonl")):
            samples[model][file.stem] = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
    return results, samples


def assert_equal_to_stock(ours: dict[str, list[dict]], stock: dict[str, tuple], benchmark: str) -> None:
    for subject in {row["subject"] for row in ours[benchmark]}:
        rows = [row for row in ours[benchmark] if row["subject"] == subject]
        stock_values, stock_acc = stock[TASK_NAMES[benchmark].format(subject)]
        assert len(rows) == len(stock_values)
        for row, expected in zip(rows, stock_values):
            assert row["loglikelihoods"] == pytest.approx(expected, abs=TOLERANCE), (benchmark, subject, row["index"])
            assert row["prediction"] == "ABCD"[max(range(4), key=lambda i: (expected[i], -i))]
        assert sum(row["correct"] for row in rows) / len(rows) == pytest.approx(stock_acc)


@pytest.fixture(scope="module")
def stock_llama(eval_models, bench_dirs):
    """Stock lm-eval on the tiny Llama: the base, and the sft adapter given to HFLM as a path (`peft=`)."""
    from lm_eval.models.huggingface import HFLM

    out = {}
    for model, extra in (("base", {}), ("sft", {"peft": eval_models["sft"]})):
        lm = HFLM(pretrained=eval_models["base"], device="cpu", batch_size=4, **extra)
        out[model] = {b: stock_samples(lm, b, SUBJECTS[b], bench_dirs[b], 5) for b in SUBJECTS}
    return out


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_every_log_likelihood_equals_stock_lm_eval(prefix_cache, eval_models, bench_dirs, stock_llama, tmp_path):
    results, samples = run_ours(
        tmp_path, eval_models["base"], bench_dirs, {"sft": eval_models["sft"]}, prefix_cache=prefix_cache
    )
    assert list(samples) == ["base", "sft"]
    for model in ("base", "sft"):
        for benchmark in SUBJECTS:
            assert_equal_to_stock(samples[model], stock_llama[model][benchmark], benchmark)
            scores = results["models"][model][benchmark]
            if prefix_cache:  # every question ran on its subject's cached prefix
                assert scores["prefix_cache"] == {"cached": scores["n"], "full_forward": 0}
            else:
                assert "prefix_cache" not in scores
    # The adapter really changes the answers (the stock side applied it as a path, ours switched it on).
    assert samples["sft"]["ceval"][0]["loglikelihoods"] != samples["base"]["ceval"][0]["loglikelihoods"]


def test_each_adapter_equals_that_adapter_loaded_alone(eval_models, bench_dirs, tmp_path):
    folders = {"ceval": bench_dirs["ceval"]}
    adapters = {"sft": eval_models["sft"], "dpo": eval_models["dpo"]}
    together, together_samples = run_ours(tmp_path / "both", eval_models["base"], folders, adapters, limit=3)
    alone, alone_samples = run_ours(
        tmp_path / "alone", eval_models["base"], folders, {"dpo": eval_models["dpo"]}, limit=3
    )
    for a, b in zip(together_samples["dpo"]["ceval"], alone_samples["dpo"]["ceval"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-6)
    assert together["models"]["dpo"] == alone["models"]["dpo"]
    assert together_samples["sft"]["ceval"] != together_samples["dpo"]["ceval"]


def test_fallback_paths_equal_stock(eval_models, bench_dirs, tmp_path, monkeypatch):
    """A prefix whose tokens are not the context's first tokens, and prompts lm-eval must cut to max_length, go
    through HFLM's own forward, counted; the numbers still equal stock lm-eval's."""
    from lm_eval.models.huggingface import HFLM

    from component.evaluate import scorer

    folders = {"mmlu": bench_dirs["mmlu"]}
    monkeypatch.setattr(scorer, "shared_prefix", lambda contexts: "Z" + contexts[0][:20])
    results, samples = run_ours(tmp_path / "mismatch", eval_models["base"], folders, {})
    assert results["models"]["base"]["mmlu"]["prefix_cache"] == {"cached": 0, "full_forward": 6}
    stock = stock_samples(
        HFLM(pretrained=eval_models["base"], device="cpu", batch_size=4), "mmlu", ["anatomy"], folders["mmlu"], 5
    )
    assert_equal_to_stock(samples["base"], stock, "mmlu")

    monkeypatch.undo()
    results, samples = run_ours(tmp_path / "short", eval_models["base"], folders, {}, max_length=96)
    counts = results["models"]["base"]["mmlu"]["prefix_cache"]
    assert counts["full_forward"] > 0 and counts["cached"] + counts["full_forward"] == 6
    lm = HFLM(pretrained=eval_models["base"], device="cpu", batch_size=4, max_length=96)
    assert_equal_to_stock(samples["base"], stock_samples(lm, "mmlu", ["anatomy"], folders["mmlu"], 5), "mmlu")


@pytest.mark.parametrize("variant", ["baichuan_13b", "baichuan2_7b", "qwen2"])
def test_baichuan_alibi_rope_and_qwen2_equal_stock(variant, tmp_path):
    """Native Baichuan (13B: ALiBi, 7B-2: RoPE + NormHead) with the real Baichuan2 tokenizer, and Qwen2 (GQA, tied
    embeddings, its byte-level BPE pre-tokenizer): the cached prefix gives stock HFLM's numbers."""
    from lm_eval.models.huggingface import HFLM

    from component.model.loader import load_for_inference, load_tokenizer
    from tests.export.tiny_models import build_baichuan, build_qwen2

    if variant == "qwen2":
        folder = build_qwen2(tmp_path / variant)
    else:
        folder = build_baichuan(tmp_path / variant, variant, layers=2, hidden=32)
    folders = write_benchmarks(tmp_path / "bench", questions=4, dev=3)
    results, samples = run_ours(tmp_path, str(folder), {"ceval": folders["ceval"]}, {}, num_fewshot=3)
    assert results["models"]["base"]["ceval"]["prefix_cache"]["cached"] == 8
    lm = HFLM(pretrained=load_for_inference(str(folder)), tokenizer=load_tokenizer(str(folder)), batch_size=4)
    assert_equal_to_stock(samples["base"], stock_samples(lm, "ceval", SUBJECTS["ceval"], folders["ceval"], 3), "ceval")


def test_4bit_base_and_adapter_equal_stock(tmp_path, demo_tokenizer, bench_dirs):
    """A 4-bit NF4 base (bitsandbytes on the CPU; hidden 128, its blocks are 64 inputs wide) with an adapter."""
    from lm_eval.models.huggingface import HFLM

    from component.demo_assets import build_tiny_model
    from component.model.loader import load_for_inference

    config = {**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 256, "max_position_embeddings": 2048}
    base = build_tiny_model(tmp_path / "base", config=config, tokenizer=demo_tokenizer)
    adapter = save_lora(base, tmp_path / "sft", 5)
    folders = {"cmmlu": bench_dirs["cmmlu"]}
    results, samples = run_ours(tmp_path, str(base), folders, {"sft": adapter}, quantization="4bit", limit=3)
    assert results["settings"]["quantization"] == "4bit"
    for model, loaded in (
        ("base", load_for_inference(str(base), quantization="4bit")),
        ("sft", load_for_inference(str(base), adapter=adapter, quantization="4bit")),
    ):
        assert "Linear4bit" in {type(m).__name__ for m in loaded.modules()}
        stock = stock_samples(HFLM(pretrained=loaded, batch_size=4), "cmmlu", SUBJECTS["cmmlu"], folders["cmmlu"], 5, 3)
        assert_equal_to_stock(samples[model], stock, "cmmlu")


def test_any_lm_eval_multiple_choice_task_passes_through(eval_models, tmp_path, monkeypatch):
    """A task that is not one of ours (here an inline lm-eval task with multi-token choices) runs through the same
    model and prefix cache, and equals stock HFLM on it."""
    from datasets import Dataset, DatasetDict
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from component.evaluate import run

    docs = [
        {"q": f"Question {i}: which word?", "choices": ["the bone", "a cell", "heart of it"], "label": i % 3}
        for i in range(5)
    ]

    def config():
        return {
            "task": "toy_mc",
            "output_type": "multiple_choice",
            "custom_dataset": lambda **_: DatasetDict({"test": Dataset.from_list(docs)}),
            "test_split": "test",
            "doc_to_text": "{{q}}\nAnswer:",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "description": "Pick a word.\n\n",
            "metric_list": [{"metric": "acc"}],
            "num_fewshot": 0,
        }

    monkeypatch.setattr(
        run,
        "load_lm_eval_tasks",
        lambda names: {"toy_mc": TaskManager(include_defaults=False).load([config()])["tasks"]},
    )
    results, samples = run_ours(tmp_path, eval_models["base"], {}, {}, tasks="toy_mc")
    assert results["models"]["base"]["toy_mc"]["prefix_cache"] == {"cached": 5, "full_forward": 0}
    stock = simple_evaluate(
        model=HFLM(pretrained=eval_models["base"], device="cpu", batch_size=4),
        tasks=[config()],
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
    )
    expected = [[ll for ll, _ in s["filtered_resps"]] for s in stock["samples"]["toy_mc"]]
    for row, values in zip(samples["base"]["toy_mc"], expected):
        assert row["loglikelihoods"] == pytest.approx(values, abs=TOLERANCE)
    assert results["models"]["base"]["toy_mc"]["acc"] == pytest.approx(stock["results"]["toy_mc"]["acc,none"])


def test_no_download_and_deterministic_results(eval_models, bench_dirs, tmp_path, monkeypatch):
    """Nothing asks datasets to load (or download) anything, and the same command writes the same results.json."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"datasets.load_dataset called: {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    adapters = {"sft": eval_models["sft"]}
    first, _ = run_ours(tmp_path / "a", eval_models["base"], bench_dirs, adapters, limit=2)
    second, _ = run_ours(tmp_path / "b", eval_models["base"], bench_dirs, adapters, limit=2)
    text = [(tmp_path / run / "out" / "results.json").read_bytes() for run in ("a", "b")]
    assert text[0] == text[1]
    assert first == second and first["models"]["sft"]["ceval"]["n"] == 4
