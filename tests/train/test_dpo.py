"""DPO: per-sequence log-probs (packed == padded == one sequence at a time), the losses (TRL parity, closed forms),
the reference choices, and the recipe end to end on the tiny Llama."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_dpo
from component.data.collators import PairCollator
from component.data.conversation import PreferencePair
from component.data.pairwise import encode_pair
from component.data.template import IGNORE_INDEX, get_template
from component.model.packed_attention import use_segment_attention
from component.train.dpo import preference_loss, sequence_logps
from component.train.lm_head import OutputHead, token_logprobs
from tests.utils import REPO, shipped_config

DEMO_PAIRS = [json.loads(line) for line in (REPO / "data/demo/preference_train.jsonl").read_text("utf-8").splitlines()]


def pair_features(tokenizer, count: int = 5, template_name: str = "human_assistant") -> list[dict]:
    """Pairs of different prompt and reply lengths, tokenized with labels as the DPO data path does."""
    template = get_template(template_name, tokenizer)
    features = []
    for i, row in enumerate(DEMO_PAIRS[:count]):
        pair = PreferencePair(row["prompt"] + "，谢谢" * i, row["chosen"], row["rejected"] + "零" * (i % 3))
        encoded = encode_pair(template, pair, None)
        features.append(
            {
                "chosen_input_ids": encoded.sequences[0],
                "chosen_labels": encoded.labels(0),
                "rejected_input_ids": encoded.sequences[1],
                "rejected_labels": encoded.labels(1),
            }
        )
    return features


def one_by_one_logps(model, features: list[dict]) -> torch.Tensor:
    """Reference computation: each sequence alone through the model's own logits."""
    values = []
    for side in ("chosen", "rejected"):
        for feature in features:
            ids = torch.tensor([feature[f"{side}_input_ids"]])
            labels = torch.tensor(feature[f"{side}_labels"])
            logits = model(input_ids=ids).logits[0, :-1].float()
            keep = labels[1:] != IGNORE_INDEX
            values.append(torch.log_softmax(logits, -1)[keep].gather(-1, labels[1:][keep, None]).sum())
    return torch.stack(values)


# --- data -------------------------------------------------------------------------------------------------------
def test_labels_cover_each_reply_and_its_eos_only(demo_tokenizer):
    (feature,) = pair_features(demo_tokenizer, 1)
    for side in ("chosen", "rejected"):
        ids, labels = feature[f"{side}_input_ids"], feature[f"{side}_labels"]
        trained = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert trained[-1] == demo_tokenizer.eos_token_id
        assert demo_tokenizer.decode(trained[:-1]) == DEMO_PAIRS[0][side]
        first = labels.index(trained[0])
        assert all(label == IGNORE_INDEX for label in labels[:first])  # nothing of the prompt is trained


# --- log-probs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "rows-of-64", "one-flat-row", "one-flat-row-segments"])
def test_sequence_logps_equal_one_sequence_at_a_time(tiny_llama_dir, demo_tokenizer, layout):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    if layout.endswith("segments"):  # the default: SDPA per sequence (model.packed_attention)
        use_segment_attention(model)
    features = pair_features(demo_tokenizer)
    collator = PairCollator(
        demo_tokenizer.pad_token_id,
        packing=layout != "padded",
        row_tokens={"rows-of-64": 64}.get(layout),
        attention_mask=False,
    )
    batch = collator(features)
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch, chunk=7)  # a chunk that splits the label positions unevenly
        expected = one_by_one_logps(model, features)
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-4)
    label_counts = [
        sum(label != IGNORE_INDEX for label in f[f"{s}_labels"][1:]) for s in ("chosen", "rejected") for f in features
    ]
    assert counts.tolist() == label_counts


def test_chunked_token_logps_gradients_equal_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    chunked = token_logprobs(hidden, targets, OutputHead(head), chunk_size=5)
    chunked.sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    full = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    full.sum().backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], head.weight.grad)


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_segments"])
@pytest.mark.parametrize("variant", ["baichuan_13b", "baichuan2_7b"])
def test_baichuan_packed_logps_equal_one_sequence_at_a_time(variant, attention, demo_tokenizer):
    from component.model.baichuan import BaichuanConfig, BaichuanForCausalLM

    torch.manual_seed(0)
    config = BaichuanConfig(
        vocab_size=len(demo_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        model_max_length=256,
        use_alibi=variant == "baichuan_13b",
        use_norm_head=variant == "baichuan2_7b",
    )
    model = BaichuanForCausalLM(config).eval()
    if attention == "sdpa_segments":
        use_segment_attention(model)
    features = pair_features(demo_tokenizer)
    batch = PairCollator(demo_tokenizer.pad_token_id, packing=True, row_tokens=None, attention_mask=False)(features)
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_logps(model, batch)[0], one_by_one_logps(model, features), rtol=0, atol=1e-4
        )


def test_qlora_packed_logps_equal_padded(tiny_llama_dir, demo_tokenizer):
    from component.model.loader import quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=quantization_config("4bit"), dtype=torch.float32
    ).eval()
    features = pair_features(demo_tokenizer)
    padded = PairCollator(demo_tokenizer.pad_token_id, attention_mask=True)(features)
    packed = PairCollator(demo_tokenizer.pad_token_id, packing=True, row_tokens="longest")(features)
    with torch.no_grad():
        # 4-bit CPU kernels round differently for different batch shapes (~1e-3)
        torch.testing.assert_close(
            sequence_logps(model, packed)[0], sequence_logps(model, padded)[0], rtol=0, atol=2e-2
        )


# --- losses -----------------------------------------------------------------------------------------------------
def test_policy_equal_to_reference_gives_ln2_for_every_pair():
    logps = torch.tensor([-3.0, -5.0, -4.0, -9.0])
    counts = torch.tensor([3.0, 4.0, 5.0, 6.0])
    loss, chosen_rewards, rejected_rewards = preference_loss("sigmoid", logps, counts, logps.clone(), beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=0, abs_tol=1e-7)
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_simpo_and_orpo_equal_their_closed_forms():
    logps = torch.tensor([-3.0, -5.0, -4.0, -9.0])
    counts = torch.tensor([3.0, 5.0, 2.0, 6.0])
    beta, gamma = 2.0, 0.5
    loss, _, _ = preference_loss("simpo", logps, counts, None, beta, simpo_gamma=gamma)
    expected = [
        -math.log(1 / (1 + math.exp(-(beta * (c / nc - r / nr) - gamma))))
        for c, r, nc, nr in [(-3, -4, 3, 2), (-5, -9, 5, 6)]
    ]
    assert math.isclose(loss.item(), sum(expected) / 2, abs_tol=1e-6)

    def log_odds(mean_logp: float) -> float:
        p = math.exp(mean_logp)
        return math.log(p / (1 - p))

    loss, _, _ = preference_loss("orpo", logps, counts, None, beta=0.1)
    expected = [
        -c / nc - 0.1 * math.log(1 / (1 + math.exp(-(log_odds(c / nc) - log_odds(r / nr)))))
        for c, r, nc, nr in [(-3, -4, 3, 2), (-5, -9, 5, 6)]
    ]
    assert math.isclose(loss.item(), sum(expected) / 2, abs_tol=1e-6)


def test_sft_weight_adds_the_chosen_nll_per_token():
    logps, counts, ref = torch.tensor([-3.0, -4.0]), torch.tensor([3.0, 2.0]), torch.tensor([-2.0, -5.0])
    plain, _, _ = preference_loss("sigmoid", logps, counts, ref, 0.1)
    with_sft, _, _ = preference_loss("sigmoid", logps, counts, ref, 0.1, sft_weight=0.5)
    assert math.isclose(with_sft.item() - plain.item(), 0.5 * 3.0 / 3.0, abs_tol=1e-6)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
)
def test_loss_and_gradients_equal_trl(tiny_llama_dir, demo_tokenizer, tmp_path, loss_type, label_smoothing):
    import trl
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy that differs from the reference, so every term of the loss is exercised
        for parameter in policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    features = pair_features(demo_tokenizer, 4)

    ours_policy = copy.deepcopy(policy).train()
    batch = PairCollator(demo_tokenizer.pad_token_id, packing=True, row_tokens=None, attention_mask=False)(features)
    logps, counts = sequence_logps(ours_policy, batch)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference, batch)
    ours, _, _ = preference_loss(loss_type, logps, counts, ref_logps, beta=0.3, label_smoothing=label_smoothing)
    ours.backward()

    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.3,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL turns on bf16 autocast by default, on the CPU too
    )
    rows = []
    for f in features:  # the same token ids: TRL's prompt / completion split of ours
        start = next(i for i, label in enumerate(f["chosen_labels"]) if label != IGNORE_INDEX)
        rows.append(
            {
                "prompt_ids": f["chosen_input_ids"][:start],
                "chosen_ids": f["chosen_input_ids"][start:],
                "rejected_ids": f["rejected_input_ids"][start:],
            }
        )
    dummy = Dataset.from_dict({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]})
    trainer = trl.DPOTrainer(
        model=policy, ref_model=reference, args=config, train_dataset=dummy, processing_class=demo_tokenizer
    )
    trl_batch = DataCollatorForPreference(pad_token_id=demo_tokenizer.pad_token_id)(rows)
    trainer.model.train()
    theirs = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)
    theirs.backward()

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for (name, mine), (_, their) in zip(ours_policy.named_parameters(), trainer.model.named_parameters()):
        torch.testing.assert_close(mine.grad, their.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- the recipe -------------------------------------------------------------------------------------------------
def dpo_args(tmp_path: Path, model: Path, **overrides) -> str:
    values = json.loads((REPO / "config/dpo/demo_lora.json").read_text(encoding="utf-8"))
    values.update(
        model_name_or_path=str(model),
        train_file=str(REPO / "data/demo/preference_eval.jsonl"),
        eval_file=None,
        output_dir=str(tmp_path / "out"),
        data_cache_dir=str(tmp_path / "cache"),
        num_train_epochs=1,
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        warmup_steps=0,
        sft_weight=0.0,  # plain DPO: the demo config adds an SFT term
        report_to=[],
    )
    values.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return str(path)


def test_dry_run_writes_the_report_and_a_preview_with_label_masks(tiny_llama_dir, tmp_path):
    assert train_dpo.main(["--train_args_file", dpo_args(tmp_path, tiny_llama_dir), "--dry_run", "true"]) is None
    report = json.loads((tmp_path / "out/data_report.json").read_text())
    assert report["examples"] == 200 and report["label_tokens"] > 0
    preview = [json.loads(line) for line in (tmp_path / "out/data_preview.jsonl").read_text().splitlines()]
    assert {"chosen_labels", "rejected_labels"} <= set(preview[0])
    assert not (tmp_path / "out/adapter_model.safetensors").exists()


def test_adapter_off_reference_equals_the_base_loaded_separately(tiny_llama_dir, tmp_path):
    trainer = train_dpo.main(["--train_args_file", dpo_args(tmp_path, tiny_llama_dir)])
    assert trainer.reference == "adapter_off" and trainer.state.global_step == 3
    features = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(features)
    model = trainer.model.eval()
    with torch.no_grad():
        reference = trainer.reference_logps(model, batch)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        expected = sequence_logps(base, batch)[0]
        policy = sequence_logps(model, batch)[0]
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    assert (policy - reference).abs().max() > 1e-4  # the trained adapter moved the policy away from the base
    assert (tmp_path / "out/adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_continued_adapter_precomputes_the_sft_policy_as_reference(tiny_llama_dir, tmp_path):
    first = train_dpo.main(["--train_args_file", dpo_args(tmp_path / "a", tiny_llama_dir)])
    adapter = first.args.output_dir
    second = train_dpo.main(
        [
            "--train_args_file",
            dpo_args(tmp_path / "b", tiny_llama_dir),
            "--adapter_name_or_path",
            adapter,
            "--max_steps",
            "1",
        ]
    )
    assert second.reference == "precomputed"
    row = second.train_dataset[0]
    batch = {k: v for k, v in second.data_collator([row]).items()}
    from peft import PeftModel

    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter).eval()
    with torch.no_grad():
        expected = sequence_logps(sft, batch)[0]
    torch.testing.assert_close(batch["ref_logps"], expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_large_batch(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    def run(name: str, **overrides) -> dict:
        train_dpo.main(
            [
                "--train_args_file",
                # plain SGD: the update is linear in the gradient, so equal gradients show as equal weights
                dpo_args(tmp_path / name, tiny_llama_dir, lr_scheduler_type="constant", optim="sgd", **overrides),
            ]
        )
        return load_file(tmp_path / name / "out/adapter_model.safetensors")

    large = run("large", per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=2)
    accumulated = run("accumulated", per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=2)
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], rtol=1e-4, atol=1e-6)


def test_the_loss_goes_down_on_the_demo_pairs(tiny_llama_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in DEMO_PAIRS[:8]), encoding="utf-8")
    args = dpo_args(tmp_path, tiny_llama_dir, train_file=str(pairs), per_device_train_batch_size=8, max_steps=15)
    trainer = train_dpo.main(["--train_args_file", args, "--learning_rate", "0.01"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # a new adapter starts as the reference
    assert losses[-1] < 0.5 * losses[0]
    margins = [entry["rewards/margins"] for entry in trainer.state.log_history if "rewards/margins" in entry]
    accuracies = [entry["rewards/accuracies"] for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    assert margins[-1] > 1.0 and accuracies[-1] == 1.0  # chosen replies gained on rejected ones, all 8 pairs


def test_unknown_loss_type_names_the_choices(tiny_llama_dir, tmp_path):
    from component.config.parser import ConfigError

    with pytest.raises(ConfigError, match=r"loss_type must be one of .*\"sigmoid\".*Did you mean 'simpo'"):
        train_dpo.main(["--train_args_file", dpo_args(tmp_path, tiny_llama_dir), "--loss_type", "simpoo"])


@pytest.mark.slow
def test_baichuan_13b_qlora_config_continues_an_sft_adapter(tmp_path, baichuan_13b_folder, fixtures_dir):
    from peft import LoraConfig, get_peft_model

    from component.model.baichuan import BaichuanForCausalLM

    sft = tmp_path / "sft"  # an SFT adapter on the tiny Baichuan-13B-shaped base, as train_sft.py would leave
    base = BaichuanForCausalLM.from_pretrained(baichuan_13b_folder)
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(sft)
    data = fixtures_dir / "datasets" / "rlhf-reward-single-round-trans_chinese.handmade.parquet"
    args_file = shipped_config(
        "dpo", "lora_config.json", tmp_path, baichuan_13b_folder, data, adapter_name_or_path=str(sft)
    )
    overrides = ["--max_steps", "2", "--bf16", "false", "--optim", "adamw_torch", "--report_to", "none"]
    trainer = train_dpo.main(["--train_args_file", args_file, *overrides])
    assert trainer.reference == "precomputed" and trainer.state.global_step == 2
    assert type(trainer.model.get_base_model()).__name__ == "BaichuanForCausalLM"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"} <= set(results)


@pytest.mark.slow
def test_hh_rlhf_qwen_config_dry_run(tmp_path, tiny_llama_dir, fixtures_dir):
    data = fixtures_dir / "datasets" / "hh-rlhf.handmade.jsonl.gz"
    train_dpo.main(
        [
            "--train_args_file",
            shipped_config("dpo", "hh_rlhf_qwen.json", tmp_path, tiny_llama_dir, data),
            "--dry_run",
            "true",
        ]
    )
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    assert [s["format"] for s in report["sources"]] == ["hh_rlhf", "hh_rlhf"] and report["examples"] == 12
    preview = json.loads((tmp_path / "out" / "data_preview.jsonl").read_text().splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    trained = [t for t, label in zip(preview["chosen_input_ids"], preview["chosen_labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained).endswith("<|im_end|>\n")  # the chat template's end of turn is trained


DDP_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import train_dpo
train_dpo.main(["--train_args_file", {args!r}])
"""


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process_with_the_same_global_batch(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.utils import run_torchrun

    single = dpo_args(
        tmp_path / "one",
        tiny_llama_dir,
        per_device_train_batch_size=8,
        max_steps=2,
        optim="sgd",
        lr_scheduler_type="constant",
    )
    train_dpo.main(["--train_args_file", single])
    double = dpo_args(
        tmp_path / "two",
        tiny_llama_dir,
        per_device_train_batch_size=4,
        max_steps=2,
        optim="sgd",
        lr_scheduler_type="constant",
    )
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), args=double), encoding="utf-8")
    run_torchrun(script)
    one, two = (load_file(tmp_path / name / "out/adapter_model.safetensors") for name in ("one", "two"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_resume_after_a_stop_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.utils import StopAfterStepCallback

    def args(name: str) -> str:
        return dpo_args(tmp_path / name, tiny_llama_dir, max_steps=4, save_strategy="steps", save_steps=2)

    train_dpo.main(["--train_args_file", args("straight")])
    resumed = args("resumed")
    train_dpo.main(["--train_args_file", resumed], callbacks=[StopAfterStepCallback(2)])
    train_dpo.main(["--train_args_file", resumed, "--resume_from_checkpoint", "true"])
    straight = load_file(tmp_path / "straight/out/adapter_model.safetensors")
    again = load_file(tmp_path / "resumed/out/adapter_model.safetensors")
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=1e-6)
