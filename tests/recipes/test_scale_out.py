"""Scale-out through the recipes on the CPU: DDP, DeepSpeed ZeRO-2/3 and FSDP2 under a 2-process torchrun.

Every engine trains the same tiny model on the same data for 4 steps and must end on the same weights as DDP
(full fine-tuning and LoRA); ZeRO-3 and FSDP must really hold ~1/2 of the parameters per rank (recorded inside
the run by tests/recipes/scale_out_probe.py); a resume from their step-2 checkpoint must equal the
uninterrupted run; the reward model trains and DPO equals DDP under ZeRO-3; config/full_qwen_zero3.json runs as shipped on a
tiny model; two single-process "nodes" (two torchrun launchers on loopback) equal one 2-process node.
One torchrun launch per engine runs all of that engine's trainings (`--then`), shared by the assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.utils import REPO, free_port, run_torchrun

pytestmark = pytest.mark.slow

PROBE = REPO / "tests/recipes/scale_out_probe.py"
ZERO3 = str(REPO / "config/deepspeed/zero3.json")
ENGINES = {
    "ddp": [],
    "zero2": ["--deepspeed", str(REPO / "config/deepspeed/zero2.json")],
    "zero3": ["--deepspeed", ZERO3],
    "fsdp": ["--fsdp", "true", "--fsdp_config", str(REPO / "config/fsdp/full_shard.json")],
}
SHARDED = ("zero3", "fsdp")  # their full runs save a step-2 checkpoint, and a resume from it runs after them


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_llama_dir) -> Path:
    folder = tmp_path_factory.mktemp("scale_out")
    rows = (REPO / "data/demo/digits_train.jsonl").read_text("utf-8").splitlines()[:32]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    pairs = (REPO / "data/demo/preference_train.jsonl").read_text("utf-8").splitlines()
    (folder / "pairs.jsonl").write_text("\n".join(pairs[:16]) + "\n", encoding="utf-8")
    (folder / "pairs_eval.jsonl").write_text("\n".join(pairs[16:24]) + "\n", encoding="utf-8")
    base = {
        "model_name_or_path": str(tiny_llama_dir),
        "train_file": str(folder / "train.jsonl"),
        "max_seq_length": 64,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 7,
        "data_cache_dir": str(folder / "cache"),
    }
    (folder / "base.json").write_text(json.dumps(base), encoding="utf-8")
    dpo = json.loads((REPO / "config/dpo/demo_lora.json").read_text(encoding="utf-8"))
    dpo.update(
        {k: base[k] for k in ("model_name_or_path", "max_steps", "logging_steps", "save_strategy", "data_cache_dir")},
        train_file=str(folder / "pairs.jsonl"),
        eval_file=None,
        eval_strategy="no",
        per_device_train_batch_size=4,
        warmup_steps=0,
        report_to=[],
    )
    (folder / "dpo.json").write_text(json.dumps(dpo), encoding="utf-8")
    return folder


def dpo(workdir: Path, name: str, *overrides) -> list:
    return ["train_dpo", "--train_args_file", workdir / "dpo.json", "--output_dir", workdir / name, *overrides]


def sft(workdir: Path, name: str, *overrides) -> list:
    return ["train_sft", "--train_args_file", workdir / "base.json", "--output_dir", workdir / name, *overrides]


def launch(*trainings: list) -> None:
    argv = [arg for training in trainings for arg in ["--then", *training]][1:]
    run_torchrun(PROBE, *argv, timeout=900)


def engine_trainings(workdir: Path, engine: str, tiny_llama_dir: Path) -> list[list]:
    flags = ENGINES[engine]
    if engine not in SHARDED:
        trainings = [sft(workdir, f"{engine}_{kind}", "--finetuning_type", kind, *flags) for kind in ("full", "lora")]
        return trainings + ([dpo(workdir, "dpo_ddp")] if engine == "ddp" else [])
    trainings = [
        sft(
            workdir,
            f"{engine}_full",
            "--finetuning_type",
            "full",
            *flags,
            "--save_strategy",
            "steps",
            "--save_steps",
            2,
        ),
        sft(workdir, f"{engine}_lora", "--finetuning_type", "lora", *flags),
        sft(workdir, f"{engine}_resumed", "--finetuning_type", "full", *flags, "--resume_from_checkpoint")
        + [workdir / f"{engine}_full/checkpoint-2"],
    ]
    if engine == "zero3":
        trainings += [
            dpo(workdir, "dpo_zero3", *flags),
            ["train_rm", "--train_args_file", workdir / "base.json", "--output_dir", workdir / "rm_zero3", *flags]
            + ["--train_file", workdir / "pairs.jsonl", "--eval_file", workdir / "pairs_eval.jsonl"]
            + ["--per_device_eval_batch_size", 4, "--max_steps", 2],
            # config/full_qwen_zero3.json as shipped but for paths and sizes (bf16, checkpointing, ZeRO-3 stay)
            ["train_sft", "--train_args_file", REPO / "config/full_qwen_zero3.json"]
            + ["--model_name_or_path", tiny_llama_dir, "--train_file", workdir / "train.jsonl"]
            + ["--output_dir", workdir / "full_qwen_zero3", "--data_cache_dir", workdir / "cache", "--num_proc", 1]
            + ["--max_seq_length", 64, "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2]
            + ["--max_steps", 2, "--save_steps", 2, "--test_size", 0, "--report_to", "none"],
        ]
    return trainings


@pytest.fixture(scope="module")
def runs(workdir, tiny_llama_dir) -> Path:
    """Every engine's trainings, one launch per engine; returns the folder holding their output folders."""
    for engine in ENGINES:
        launch(*engine_trainings(workdir, engine, tiny_llama_dir))
    return workdir


def weights(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(out / name)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def shards(out: Path) -> list[dict]:
    return [json.loads((out / "shards" / f"rank{r}.json").read_text()) for r in range(2)]


def memory_table(runs: Path) -> str:
    """Per-rank parameter elements and optimizer-state bytes, as docs/scale_out.md shows them."""
    lines = [
        "| run | parameters held per rank | of the model | parameter bytes per rank | optimizer state per rank |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in ("full", "lora"):
        for engine in ENGINES:
            rank = shards(runs / f"{engine}_{kind}")[0]
            share = rank["param_numel_local"] / rank["param_numel_full"]
            lines.append(
                f"| {engine} {kind} | {rank['param_numel_local']:,} | {share:.1%} | {rank['param_bytes_local']:,} B | "
                f"{rank['optimizer_state_bytes']:,} B |"
            )
    return "\n".join(lines)


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
def test_every_engine_ends_on_the_ddp_weights(runs, engine, kind):
    result = weights(runs / f"{engine}_{kind}")
    assert all(t.dtype == torch.float32 for t in result.values())  # ZeRO-3's gathered save keeps the training dtype
    assert max_difference(weights(runs / f"ddp_{kind}"), result) < 1e-4, engine


def test_training_moved_the_weights(runs, tiny_llama_dir):
    before = load_file(tiny_llama_dir / "model.safetensors")
    assert max_difference(before, weights(runs / "ddp_full")) > 1e-3  # else equal-to-DDP would say nothing


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_zero3_and_fsdp_hold_half_the_parameters_per_rank(runs, kind):
    replica = shards(runs / f"ddp_{kind}")
    assert all(r["param_numel_local"] == r["param_numel_full"] for r in replica)  # DDP: a whole copy per rank
    for engine in SHARDED:
        for rank in shards(runs / f"{engine}_{kind}"):
            assert rank["world_size"] == 2 and rank["param_numel_full"] == replica[0]["param_numel_full"]
            assert 0.45 < rank["param_numel_local"] / rank["param_numel_full"] < 0.56, (engine, rank)
    for engine in ("zero2", *SHARDED):  # all three shard the optimizer state
        for rank in shards(runs / f"{engine}_{kind}"):
            assert 0.45 < rank["optimizer_state_bytes"] / replica[0]["optimizer_state_bytes"] < 0.56, (engine, rank)
    (runs / "memory_table.md").write_text(memory_table(runs) + "\n", encoding="utf-8")


@pytest.mark.parametrize("engine", SHARDED)
def test_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(runs, engine):
    resumed = runs / f"{engine}_resumed"
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]  # 1-2 from the checkpoint
    assert max_difference(weights(runs / f"{engine}_full"), weights(resumed)) < 1e-6


def test_the_zero3_outputs_load_back_through_our_loaders(runs, tiny_llama_dir):
    from component.model.loader import load_for_inference

    full = runs / "zero3_full"
    saved = weights(full)
    loaded = load_for_inference(str(full)).state_dict()
    assert max_difference(saved, {k: loaded[k] for k in saved}) == 0
    lora = runs / "zero3_lora"
    model = load_for_inference(str(tiny_llama_dir), adapter=str(lora))
    adapter = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".lora_" in k}
    assert max_difference(weights(lora), adapter) == 0


def test_reward_model_trains_under_zero3_with_its_score_head(runs):
    out = runs / "rm_zero3"
    adapter = load_file(out / "adapter_model.safetensors")
    head = [k for k in adapter if ".score." in k]
    assert head and all(adapter[k].shape == (1, 64) for k in head)  # the gathered head, not a rank's shard
    assert 0.0 <= json.loads((out / "eval_results.json").read_text())["eval_accuracy"] <= 1.0
    assert all(0.45 < r["param_numel_local"] / r["param_numel_full"] < 0.56 for r in shards(out))

    from component.inference.scoring import load_reward_model

    model = load_reward_model(str(out))[0]
    reloaded = [v for k, v in model.state_dict().items() if "score.modules_to_save" in k and k.endswith("weight")]
    assert len(reloaded) == 1 and torch.equal(reloaded[0].float(), adapter[head[0]].float())


def test_dpo_under_zero3_equals_ddp(runs):
    """A later recipe gets ZeRO-3 from the same argument loading (its policy and adapter-off reference)."""
    assert max_difference(weights(runs / "dpo_ddp"), weights(runs / "dpo_zero3")) < 1e-4
    assert all(0.45 < r["param_numel_local"] / r["param_numel_full"] < 0.56 for r in shards(runs / "dpo_zero3"))


def test_full_qwen_zero3_config_runs_as_shipped_on_a_tiny_model(runs):
    out = runs / "full_qwen_zero3"
    shipped = json.loads((REPO / "config/full_qwen_zero3.json").read_text())
    resolved = json.loads((out / "train_args.json").read_text())
    for key in ("deepspeed", "finetuning_type", "bf16", "gradient_checkpointing", "learning_rate", "lr_scheduler_type"):
        assert resolved[key] == shipped[key], key
    saved = load_file(out / "model.safetensors")  # stage3_gather_16bit_weights_on_model_save: one whole file
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert (out / "checkpoint-2").is_dir()
    assert all(0.45 < r["param_numel_local"] / r["param_numel_full"] < 0.56 for r in shards(out))


def test_two_nodes_on_loopback_equal_one_node_with_two_processes(runs):
    """Two torchrun launchers, --nnodes 2 --node_rank 0/1 --nproc_per_node 1, rendezvous on 127.0.0.1."""
    port = free_port()
    out = runs / "two_nodes"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    training = [str(a) for a in sft(runs, "two_nodes", "--finetuning_type", "full")]
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank)]
            + ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), str(PROBE)]
            + training,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert [r["world_size"] for r in shards(out)] == [2, 2]
    assert max_difference(weights(runs / "ddp_full"), weights(out)) < 1e-6
