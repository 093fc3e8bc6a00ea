"""Training through train_sft.py on tiny models: real 4-bit QLoRA, exact resume, 2-process torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_sft
from tests.utils import REPO, StopAfterStepCallback, free_port, run_torchrun

pytestmark = pytest.mark.slow


def write_args(tmp_path: Path, name: str, **values) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return str(path)


@pytest.fixture()
def train_args(tmp_path, tiny_llama_dir):
    rows = [json.loads(line) for line in (REPO / "data/demo/digits_train.jsonl").read_text("utf-8").splitlines()]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:96]), encoding="utf-8")
    return {
        "model_name_or_path": str(tiny_llama_dir),
        "train_file": str(data),
        "max_seq_length": 64,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 3,
        "report_to": "none",
        "data_cache_dir": str(tmp_path / "cache"),
        "seed": 7,
    }


def first_last_loss(output_dir: Path) -> tuple[float, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


def test_qlora_4bit_trains_and_the_adapter_reloads_to_identical_logits(tmp_path, train_args):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from component.model.loader import quantization_config

    out = tmp_path / "qlora"
    trainer = train_sft.main(
        [
            "--train_args_file",
            write_args(
                tmp_path,
                "qlora",
                **{**train_args, "learning_rate": 2e-2, "report_to": "tensorboard"},
                output_dir=str(out),
                finetuning_type="qlora",
                max_steps=16,
            ),
            "--gradient_checkpointing",
            "true",
        ]
    )
    base = trainer.model.get_base_model()
    assert any("Linear4bit" in type(m).__name__ for m in base.modules()), "weights were not loaded in 4-bit"
    first, last = first_last_loss(out)
    assert last < first - 0.5, (first, last)  # a broken gradient path leaves it flat
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "train_args.json",
        "data_report.json",
        "training_loss.png",
    ):
        assert (out / name).is_file(), name
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard logs"

    inputs = torch.tensor([trainer.train_dataset[0]["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(input_ids=inputs).logits
    reloaded_base = AutoModelForCausalLM.from_pretrained(
        train_args["model_name_or_path"], quantization_config=quantization_config("4bit"), dtype=torch.float32
    )
    reloaded = PeftModel.from_pretrained(reloaded_base, str(out)).eval()
    with torch.no_grad():
        again = reloaded(input_ids=inputs).logits
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-5)


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, train_args):
    straight = tmp_path / "straight"
    train_sft.main(
        ["--train_args_file", write_args(tmp_path, "a", **train_args, output_dir=str(straight), max_steps=9)]
    )

    resumed = tmp_path / "resumed"
    args_file = write_args(tmp_path, "b", **train_args, output_dir=str(resumed), max_steps=9)
    train_sft.main(["--train_args_file", args_file], callbacks=[StopAfterStepCallback(3)])
    assert (resumed / "checkpoint-3").is_dir()
    train_sft.main(["--train_args_file", args_file, "--resume_from_checkpoint", "true"])

    def final(output_dir: Path):
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        return [e["loss"] for e in history if "loss" in e and e["step"] > 3]

    assert final(resumed) == pytest.approx(final(straight), abs=1e-6)
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_torchrun_two_processes_on_cpu(tmp_path, train_args):
    out = tmp_path / "ddp"
    args_file = write_args(
        tmp_path, "ddp", **{**train_args, "per_device_train_batch_size": 4}, output_dir=str(out), max_steps=4
    )
    run_torchrun(REPO / "train_sft.py", "--train_args_file", args_file)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert (out / "adapter_model.safetensors").is_file()
    saved = sorted(str(p.relative_to(out)) for p in out.glob("**/adapter_model.safetensors"))
    assert saved == [
        "adapter_model.safetensors",
        "checkpoint-3/adapter_model.safetensors",
        "checkpoint-4/adapter_model.safetensors",
    ]  # written once, by rank 0
    # 96 examples / (2 processes x 4) = 12 steps per epoch; one process alone would need 24
    assert state["epoch"] == pytest.approx(4 / 12)


# Rank 0 writes its last file slowly; each rank then notes when its recipe returned.
RANKS_LEAVE_TOGETHER = """
import os, sys, time
from pathlib import Path
import component.train.recipe as recipe
import train_sft
plot = recipe.plot_loss
def slow_plot(*args):
    time.sleep(3)
    path = plot(*args)
    Path(sys.argv[2], "rank0_wrote").write_text(str(time.time()))
    return path
recipe.plot_loss = slow_plot
train_sft.main(["--train_args_file", sys.argv[1]])
Path(sys.argv[2], "rank" + os.environ["RANK"] + "_left").write_text(str(time.time()))
"""


def test_under_torchrun_no_rank_leaves_before_rank_0_has_written_everything(tmp_path, train_args):
    out = tmp_path / "together"
    args_file = write_args(
        tmp_path, "together", **{**train_args, "save_strategy": "no"}, output_dir=str(out), max_steps=1
    )
    script = tmp_path / "ranks_leave_together.py"
    script.write_text(RANKS_LEAVE_TOGETHER, encoding="utf-8")
    run_torchrun(script, args_file, tmp_path)
    wrote = float((tmp_path / "rank0_wrote").read_text())
    # a rank exiting while another still writes can abort in interpreter finalization (gloo's threads, SIGABRT)
    assert float((tmp_path / "rank1_left").read_text()) >= wrote
    assert float((tmp_path / "rank0_left").read_text()) >= wrote


# Registered before the recipe's own handler, so it runs after it (atexit is last in, first out).
PROCESS_GROUP_AT_EXIT = """
import atexit, sys
import torch.distributed as dist
import train_sft
atexit.register(lambda: print("process group at exit:", dist.is_initialized()))
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
train_sft.main(["--train_args_file", sys.argv[1]])
"""


def test_a_run_releases_its_process_group_before_the_interpreter_exits(tmp_path, train_args):
    import subprocess
    import sys

    args = write_args(tmp_path, "pg", output_dir=str(tmp_path / "pg"), dry_run=True, **train_args)
    done = subprocess.run(
        [sys.executable, "-c", PROCESS_GROUP_AT_EXIT, args, str(free_port())], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # gloo's threads left to interpreter finalization can abort a finished run (SIGABRT)
    assert "process group at exit: False" in done.stdout
