"""The training process's housekeeping (component/train/host.py): freed blocks reused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.utils import REPO

# A training step's activations, shrunk: ten tensors alive at once, of a size that changes from step to step (packed
# rows differ in length), freed at the end of the step. Counted: the page faults of the steps after the two largest.
FAULTS_OF_STEPS = """
import resource, sys, torch
from component.train.host import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step(mib):
    blocks = [torch.ones(mib * 2**18) for _ in range(10)]
    del blocks
step(10); step(16)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in (10, 4, 8, 12):
    step(mib)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_OF_STEPS = 10 * (10 + 4 + 8 + 12) * 2**20 // 4096


def faults_of_steps(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_STEPS, mode], cwd=REPO, capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (Linux)")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    plain, kept = faults_of_steps("plain"), faults_of_steps("keep")
    assert plain > PAGES_OF_STEPS / 4  # glibc's defaults: much of each step's memory comes from the kernel, zeroed
    assert kept < PAGES_OF_STEPS / 50  # kept: the freed blocks are reused


def test_every_recipes_trainer_trains_with_freed_blocks_kept(tiny_llama_dir, tmp_path, monkeypatch):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    from component.data.collators import PaddingCollator
    from component.train import host
    from component.train.sft import SFTTrainer

    calls = []
    monkeypatch.setattr(host, "keep_freed_memory", lambda: calls.append("kept") or True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = list(range(4, 20))
    data = Dataset.from_list([{"input_ids": ids, "labels": ids, "length": len(ids)}] * 2)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
    )
    SFTTrainer(model=model, args=args, train_dataset=data, data_collator=PaddingCollator(0)).train()
    assert calls == ["kept"]  # through ReliableTrainerMixin.train, which the DPO, RM and RL trainers share
