"""Loss normalisation: one mean over every label token of the optimizer step, whatever the batching.

transformers' Trainer counts the label tokens of all micro-batches of a step (`num_items_in_batch`, over
labels[..., 1:]) and, under DDP, of all processes (`average_tokens_across_devices`), and divides the summed
token losses by that count. These tests check it through the real Trainer with SGD at learning rate 1, where
a parameter's update is minus its gradient: batch 4 = batch 2 x accumulation 2 = packed = padded and grouped
= 2 DDP processes x batch 2, with examples whose label counts differ by 20x, and all equal the hand-computed
gradient of (sum of token losses) / (label tokens). Averaging per micro-batch means, which the counts rule
out, would give a different update: the test checks that too, so it can tell the two apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from component.data.collators import PackingCollator, PaddingCollator
from component.data.template import IGNORE_INDEX
from tests.utils import REPO, run_torchrun

# Label tokens per example (after the first position): 3, 60, 8, 2 -> micro-batches of 63 and 10.
SHAPES = [(6, 4), (10, 61), (20, 9), (30, 3)]


def examples(vocab_size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for prompt, reply in SHAPES:
        ids = torch.randint(4, vocab_size, (prompt + reply,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": len(ids)})
    return rows


def sgd_step_update(
    model_dir: Path, rows: list[dict], output_dir: Path, collator, logits_path: str = "model", **training
) -> dict:
    """Parameter change of one Trainer optimizer step with plain SGD at lr 1: minus the step's gradient."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    from component.train.sft import SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False  # as load_model: packed rows read from the position_ids
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: the update is the raw gradient
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        **{"train_sampling_strategy": "sequential", **training},
    )
    data = Dataset.from_list(rows)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, data_collator=collator, logits_path=logits_path)
    trainer.logits_chunk_size = 16  # several chunks per micro-batch
    trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def reference_gradient(model_dir: Path, rows: list[dict], per_micro_batch_mean: int | None = None) -> dict:
    """d/dθ of (sum of every token loss) / (label tokens), one example at a time; or, for comparison, the
    mean of per-micro-batch means (micro-batches of `per_micro_batch_mean` examples)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    counts = [sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows]
    size = per_micro_batch_mean or len(rows)
    groups = [list(range(i, min(i + size, len(rows)))) for i in range(0, len(rows), size)]
    for group in groups:
        denominator = sum(counts[i] for i in group) * len(groups)
        for i in group:
            out = model(input_ids=torch.tensor([rows[i]["input_ids"]]), labels=torch.tensor([rows[i]["labels"]]))
            (out.loss * counts[i] / denominator).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_close(update: dict, gradient: dict) -> None:
    for name, value in gradient.items():
        assert torch.allclose(update[name], value, atol=1e-6, rtol=1e-4), name


def max_difference(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def rows(tiny_llama_dir) -> list[dict]:
    from transformers import AutoConfig

    return examples(AutoConfig.from_pretrained(tiny_llama_dir).vocab_size)


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, rows) -> dict:
    return reference_gradient(tiny_llama_dir, rows)


@pytest.mark.parametrize("logits_path", ["model", "chunked"])
@pytest.mark.parametrize(
    "name, collator, training",
    [
        ("batch 4", PaddingCollator(0), {"per_device_train_batch_size": 4}),
        ("batch 2 x accumulation 2", PaddingCollator(0), {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}),
        ("batch 1 x accumulation 4", PaddingCollator(0), {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}),
        ("packed batch 4", PackingCollator(0), {"per_device_train_batch_size": 4}),
        ("packed rows, batch 2 x accumulation 2", PackingCollator(0, 40), {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}),
        ("length-grouped batch 2 x accumulation 2", PaddingCollator(0), {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "train_sampling_strategy": "group_by_length"}),
    ],
)  # fmt: skip
def test_step_gradient_is_the_label_token_mean_whatever_the_batching(
    tmp_path, tiny_llama_dir, rows, expected, name, collator, training, logits_path
):
    update = sgd_step_update(tiny_llama_dir, rows, tmp_path, collator, logits_path, **training)
    assert_close(update, expected)


def test_per_micro_batch_means_would_differ(tiny_llama_dir, rows, expected):
    """The label counts (63 vs 10 per micro-batch) make the wrong normalisation visible to the tests above."""
    naive = reference_gradient(tiny_llama_dir, rows, per_micro_batch_mean=2)
    scale = max(v.abs().max().item() for v in expected.values())
    assert max_difference(naive, expected) > 100 * 1e-6 * max(scale, 1.0)


DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from tests.train.test_loss_normalisation import sgd_step_update
from component.data.collators import PackingCollator, PaddingCollator
rows = json.loads(open({rows!r}).read())
updates = {{
    (name, path): sgd_step_update({model!r}, rows, {out!r}, collator, path, per_device_train_batch_size=2)
    for name, collator in (("padded", PaddingCollator(0)), ("packed", PackingCollator(0)))
    for path in ("model", "chunked")
}}
if torch.distributed.get_rank() == 0:
    torch.save(updates, {result!r})
"""


@pytest.mark.slow
def test_ddp_two_processes_give_the_single_process_gradient(tmp_path, tiny_llama_dir, rows, expected):
    """2 processes x batch 2 (63 and 10 label tokens), padded and packed, both LM-head paths: every rank divides
    by the global count."""
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script, result = tmp_path / "ddp_step.py", tmp_path / "updates.pt"
    values = {"repo": str(REPO), "rows": str(tmp_path / "rows.json"), "model": str(tiny_llama_dir)}
    script.write_text(DDP_SCRIPT.format(**values, out=str(tmp_path / "out"), result=str(result)))
    run_torchrun(script)
    updates = torch.load(result)
    assert set(updates) == {(b, p) for b in ("padded", "packed") for p in ("model", "chunked")}
    for update in updates.values():
        assert_close(update, expected)
