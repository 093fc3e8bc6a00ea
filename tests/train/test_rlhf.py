"""train_rlhf.py end to end on the tiny Llama: rewards as `generate.py score` sees them, constant rewards leave the
policy alone, a learnable reward is learned, torchrun, resume, samples and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_rlhf
from component.config.parser import ConfigError
from tests.utils import REPO, StopAfterStepCallback, run_torchrun

pytestmark = pytest.mark.slow


def rl_args(tmp_path: Path, model: Path, **overrides) -> str:
    values = json.loads((REPO / "config/rlhf/demo_grpo.json").read_text(encoding="utf-8"))
    values.update(
        model_name_or_path=str(model),
        adapter_name_or_path=None,
        reward_model=None,
        exact_match_weight=0.0,
        reward_function="tests.train.rl_rewards:short",
        train_file=str(REPO / "data/demo/digits_eval.jsonl"),
        max_samples=64,
        output_dir=str(tmp_path / "out"),
        data_cache_dir=str(tmp_path / "cache"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_new_tokens=6,
        max_steps=3,
        logging_steps=1,
        sample_log_steps=1,
        save_strategy="no",
        report_to=[],
    )
    values.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "rl.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return str(path)


def test_a_constant_reward_leaves_the_policy_unchanged(tiny_llama_dir, tmp_path):
    for algorithm in ("grpo", "rloo"):
        args = rl_args(
            tmp_path / algorithm, tiny_llama_dir, algorithm=algorithm, reward_function="tests.train.rl_rewards:constant"
        )
        trainer = train_rlhf.main(["--train_args_file", args])
        lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().max() == 0 for p in lora_b), algorithm  # a new adapter starts at B = 0
        logged = [e for e in trainer.state.log_history if "loss" in e]
        assert all(e["loss"] == 0 for e in logged) and all(e["kl"] == 0 for e in logged)


def test_a_learnable_reward_is_learned_and_samples_are_logged(tiny_llama_dir, tmp_path):
    args = rl_args(tmp_path, tiny_llama_dir, max_steps=12, learning_rate=0.01, max_samples=16)
    trainer = train_rlhf.main(["--train_args_file", args])
    rewards = [e["rewards/total/mean"] for e in trainer.state.log_history if "rewards/total/mean" in e]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3  # shorter answers, as rewarded
    samples = [json.loads(line) for line in (tmp_path / "out/samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion", "reward/function", "reward/total"} <= set(samples[0])
    assert (tmp_path / "out/adapter_model.safetensors").is_file()
    for key in ("kl", "entropy", "clip_fraction", "completions/mean_length", "rewards/function/std"):
        assert key in trainer.state.log_history[0], key


def test_the_reward_seen_by_training_equals_the_score_command(tiny_llama_dir, tmp_path):
    from component.config.inference import ScoreOptions
    from component.inference.scoring import score_file

    rm = tmp_path / "rm"  # a reward model as train_rm.py leaves it: a LoRA with a trained score head
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1, pad_token_id=3)
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["score"], task_type="SEQ_CLS")
    get_peft_model(model, config).save_pretrained(rm)
    train_args = {"model_name_or_path": str(tiny_llama_dir), "template": "human_assistant", "max_seq_length": 64}
    (rm / "train_args.json").write_text(json.dumps(train_args), encoding="utf-8")

    args = rl_args(tmp_path, tiny_llama_dir, reward_model=str(rm), reward_function=None, max_steps=1)
    train_rlhf.main(["--train_args_file", args])
    samples = [json.loads(line) for line in (tmp_path / "out/samples.jsonl").read_text().splitlines()]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": s["prompt"], "response": s["completion"]}, ensure_ascii=False) + "\n" for s in samples
        ),
        encoding="utf-8",
    )
    options = ScoreOptions(reward_model=str(rm), input=str(rows), output=str(tmp_path / "scores.jsonl"))
    score_file(options)
    scored = [json.loads(line)["score"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert scored == pytest.approx([s["reward/reward_model"] for s in samples], abs=1e-5)


DDP_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import train_rlhf
train_rlhf.main(["--train_args_file", {args!r}])
"""


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_two_process_torchrun_trains_and_saves_once(tiny_llama_dir, tmp_path, algorithm):
    args = rl_args(tmp_path, tiny_llama_dir, algorithm=algorithm, max_steps=2, per_device_train_batch_size=2)
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), args=args), encoding="utf-8")
    result = run_torchrun(script)
    assert (tmp_path / "out/adapter_model.safetensors").is_file()
    assert (tmp_path / "out/value_head.safetensors").is_file() == (algorithm == "ppo")
    assert result.stdout.count("'loss'") + result.stderr.count("'loss'") >= 1


def test_resume_continues_with_the_same_state(tiny_llama_dir, tmp_path):
    def args(name: str) -> str:
        return rl_args(
            tmp_path / name, tiny_llama_dir, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=0.01
        )

    train_rlhf.main(["--train_args_file", args("straight")])
    resumed = args("resumed")
    train_rlhf.main(["--train_args_file", resumed], callbacks=[StopAfterStepCallback(2)])
    train_rlhf.main(["--train_args_file", resumed, "--resume_from_checkpoint", "true"])
    straight = load_file(tmp_path / "straight/out/adapter_model.safetensors")
    again = load_file(tmp_path / "resumed/out/adapter_model.safetensors")
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=1e-6)


def test_settings_that_cannot_work_name_the_key(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="no reward"):
        train_rlhf.main(["--train_args_file", rl_args(tmp_path, tiny_llama_dir, reward_function=None)])
    with pytest.raises(ConfigError, match="num_generations' must be >= 2 for rloo"):
        train_rlhf.main(["--train_args_file", rl_args(tmp_path, tiny_llama_dir, algorithm="rloo", num_generations=1)])
    with pytest.raises(ConfigError, match="leaves no room"):
        train_rlhf.main(["--train_args_file", rl_args(tmp_path, tiny_llama_dir, max_new_tokens=64)])
    with pytest.raises(ConfigError, match="PPO keys out of range"):
        train_rlhf.main(["--train_args_file", rl_args(tmp_path, tiny_llama_dir, algorithm="ppo", lam=1.5)])


def test_a_reward_model_that_is_not_one_is_refused(tiny_llama_dir, tmp_path):
    from component.config.errors import UserFacingError

    args = rl_args(tmp_path, tiny_llama_dir, reward_model=str(tiny_llama_dir))  # a causal LM, not a train_rm.py output
    with pytest.raises(UserFacingError, match="expected a train_rm.py output_dir"):
        train_rlhf.main(["--train_args_file", args])


def shipped_rl_config(tmp_path: Path, name: str, model: Path, data: Path, **overrides) -> str:
    values = json.loads((REPO / "config" / "rlhf" / name).read_text(encoding="utf-8"))
    spec = values["train_file"]
    (tmp_path / "rm").mkdir(parents=True, exist_ok=True)
    values.update(
        model_name_or_path=str(model),
        train_file={**spec, "path": str(data)} if isinstance(spec, dict) else str(data),
        reward_model=str(tmp_path / "rm"),
        output_dir=str(tmp_path / "out"),
        data_cache_dir=str(tmp_path / "cache"),
        **overrides,
    )
    path = tmp_path / name
    path.write_text(json.dumps(values), encoding="utf-8")
    return str(path)


def test_baichuan_grpo_config_dry_run_reads_the_safety_prompts(tmp_path, baichuan_13b_folder, fixtures_dir):
    data = fixtures_dir / "datasets" / "safety_prompts.typical_safety_scenarios.handmade.json"
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "adapter_config.json").write_text("{}", encoding="utf-8")
    args = shipped_rl_config(tmp_path, "lora_config.json", baichuan_13b_folder, data, adapter_name_or_path=str(sft))
    assert train_rlhf.main(["--train_args_file", args, "--dry_run", "true"]) is None
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert report["sources"][0]["format"] == "safety_prompts" and report["examples"] > 0
    assert report["sources"][0]["skipped"].get("scenario_excluded", 0) > 0  # the config's scenarios only


def test_rloo_qwen_config_reads_prompts_from_a_preference_file(tmp_path, tiny_llama_dir, fixtures_dir):
    data = fixtures_dir / "datasets" / "hh-rlhf.handmade.jsonl.gz"
    args = shipped_rl_config(tmp_path, "rloo_qwen.json", tiny_llama_dir, data, max_seq_length=512)
    assert train_rlhf.main(["--train_args_file", args, "--dry_run", "true"]) is None
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    source = report["sources"][0]
    assert source["format"] == "hh_rlhf" and source["read"] == 6 and report["examples"] == 5
    assert source["skipped"] == {"prompt_leaves_no_room": 1}  # counted: 256 new tokens leave too little room
    preview = json.loads((tmp_path / "out/data_preview.jsonl").read_text().splitlines()[0])
    from component.model.loader import load_tokenizer

    text = load_tokenizer(str(tiny_llama_dir)).decode(preview["prompt_ids"])
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt of the chat template
    prompts = [json.loads(line) for line in (tmp_path / "out/prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 5 and prompts[0]["prompt"].endswith("assistant\n")  # for OpenRLHF / verl
    assert prompts[0]["question"] in prompts[0]["prompt"] and prompts[0]["reference"]


def test_ppo_learns_and_saves_its_value_head(tiny_llama_dir, tmp_path):
    args = rl_args(tmp_path, tiny_llama_dir, algorithm="ppo", max_steps=12, learning_rate=0.01, max_samples=16)
    trainer = train_rlhf.main(["--train_args_file", args])
    logged = [e for e in trainer.state.log_history if "loss" in e]
    rewards = [e["rewards/total/mean"] for e in logged]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3  # shorter answers, as rewarded
    for key in ("value_loss", "explained_variance", "value_clip_fraction", "kl", "clip_fraction", "entropy"):
        assert key in logged[0], key
    assert logged[-1]["explained_variance"] > logged[0]["explained_variance"]  # the value head learns
    saved = load_file(tmp_path / "out/value_head.safetensors")
    head = trainer.value_head.state_dict()
    assert set(saved) == {"summary.weight", "summary.bias"} and saved["summary.weight"].abs().sum() > 0
    for key in saved:
        torch.testing.assert_close(saved[key], head[key].cpu(), rtol=0, atol=0)


def test_ppo_resume_restores_policy_and_value_head(tiny_llama_dir, tmp_path):
    def args(name: str) -> str:
        return rl_args(
            tmp_path / name,
            tiny_llama_dir,
            algorithm="ppo",
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            learning_rate=0.01,
        )

    train_rlhf.main(["--train_args_file", args("straight")])
    resumed = args("resumed")
    train_rlhf.main(["--train_args_file", resumed], callbacks=[StopAfterStepCallback(2)])
    assert (tmp_path / "resumed/out/checkpoint-2/value_head.safetensors").is_file()
    train_rlhf.main(["--train_args_file", resumed, "--resume_from_checkpoint", "true"])
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        straight = load_file(tmp_path / "straight/out" / name)
        again = load_file(tmp_path / "resumed/out" / name)
        for key in straight:
            torch.testing.assert_close(again[key], straight[key], rtol=0, atol=1e-6)


def test_truncated_completions_can_be_penalised(tiny_llama_dir, tmp_path):
    args = rl_args(
        tmp_path,
        tiny_llama_dir,
        reward_function="tests.train.rl_rewards:constant",
        truncated_completion_penalty=0.5,
        max_new_tokens=3,  # the tiny random model rarely stops this soon
        max_steps=1,
        sample_log_steps=1,
    )
    train_rlhf.main(["--train_args_file", args])
    samples = [json.loads(line) for line in (tmp_path / "out/samples.jsonl").read_text().splitlines()]
    assert any(s["reward/truncated"] == -1 for s in samples)
    for sample in samples:
        assert sample["reward/total"] == pytest.approx(1.0 + 0.5 * sample["reward/truncated"])


def test_beta_zero_runs_no_reference_pass(tiny_llama_dir, tmp_path, monkeypatch):
    import component.train.rlhf as rlhf

    entered = []
    original = rlhf.as_reference

    def counting(*args, **kwargs):
        entered.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(rlhf, "as_reference", counting)
    for algorithm in ("grpo", "rloo", "ppo"):
        trainer = train_rlhf.main(
            [
                "--train_args_file",
                rl_args(tmp_path / algorithm, tiny_llama_dir, algorithm=algorithm, beta=0.0, max_steps=1),
            ]
        )
        assert not entered and "kl" not in trainer.state.log_history[0], algorithm
