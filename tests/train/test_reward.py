"""Reward model: pooling, loss, metrics, pair truncation, packing, QLoRA training, reload and the score CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, EvalPrediction

import generate
import train_rm
from component.data.collators import PairCollator
from component.data.conversation import Conversation, PreferencePair, Turn
from component.data.pairwise import encode_pair
from component.data.template import get_template
from component.inference.scoring import load_reward_model, score_conversations
from component.model.loader import load_tokenizer, quantization_config
from component.model.reward_head import last_token_index, sequence_scores
from component.train.reward import compute_metrics, pairwise_loss, pairwise_metrics
from tests.utils import REPO, shipped_config

PAIR = PreferencePair("把 4071 逐位写成汉字", "四零七一", "四零七二")
DEMO_PAIRS = [json.loads(line) for line in (REPO / "data/demo/preference_train.jsonl").read_text("utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_args(tmp_path: Path, name: str, **values) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return str(path)


# --- pooling -----------------------------------------------------------------------------------------
class PositionEcho(nn.Module):
    """A stand-in model whose `score` head outputs each token's position: the pooled score is the index."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Identity()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        positions = torch.arange(input_ids.shape[1], dtype=torch.float).expand(input_ids.shape)
        return self.score(positions.unsqueeze(-1))


EOS = PAD = 2  # pad id == eos id, as with many base tokenizers


@pytest.mark.parametrize(
    ("input_ids", "attention_mask", "expected"),
    [
        ([[5, 6, EOS, PAD, PAD], [5, 6, 7, 8, EOS]], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], [2, 4]),  # right padding
        ([[PAD, PAD, 5, 6, EOS], [5, 6, 7, 8, EOS]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], [4, 4]),  # left padding
        ([[EOS, 6, EOS, PAD, PAD]], [[1, 1, 1, 0, 0]], [2]),  # eos inside the text too
    ],
    ids=["right", "left", "eos-in-text"],
)
def test_pooling_reads_the_last_real_token_from_the_attention_mask(input_ids, attention_mask, expected):
    ids, mask = torch.tensor(input_ids), torch.tensor(attention_mask)
    assert last_token_index(mask).tolist() == expected
    assert sequence_scores(PositionEcho(), ids, attention_mask=mask).tolist() == expected


def test_pooling_with_pad_equal_to_eos_matches_unpadded_scores_on_a_real_model(tiny_llama_dir):
    """The stock forward would pool at the token before EOS here; ours reads the EOS itself."""
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_llama_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id
    ).eval()
    template = get_template("human_assistant", tokenizer)
    pairs = [PreferencePair.from_dict({**row, "history": []}) for row in DEMO_PAIRS[:3]]
    sequences = [encode_pair(template, pair, None).sequences[0] for pair in pairs]
    sequences[1] = sequences[1][:-3] + [template.eos_id]  # a shorter one, so others get padded
    batch = PairCollator(tokenizer.pad_token_id)([{"chosen_input_ids": s, "rejected_input_ids": s} for s in sequences])
    with torch.no_grad():
        batched = sequence_scores(model, batch["input_ids"], batch["attention_mask"])[: len(sequences)]
        alone = [sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in sequences]
        stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(batched, torch.cat(alone), rtol=0, atol=1e-5)
    assert not torch.allclose(stock[: len(sequences)], batched)  # pad == eos fools the stock pooling


# --- loss and metrics -----------------------------------------------------------------------------
def test_pairwise_loss_is_the_formula_in_fp32():
    chosen = torch.tensor([2.0, 0.5, -1.0], dtype=torch.bfloat16)
    rejected = torch.tensor([1.0, 1.5, -3.0], dtype=torch.bfloat16)
    expected = np.mean([-math.log(1 / (1 + math.exp(-d))) for d in (1.0, -1.0, 2.0)])
    loss = pairwise_loss(chosen, rejected)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    with_margin = np.mean([-math.log(1 / (1 + math.exp(-(d - 0.5)))) for d in (1.0, -1.0, 2.0)])
    assert pairwise_loss(chosen, rejected, margin=0.5).item() == pytest.approx(with_margin, abs=1e-6)


def test_accuracy_and_score_metrics_on_known_scores():
    chosen = np.array([3.0, 0.0, 1.0, 2.0])
    rejected = np.array([1.0, 0.0, 2.0, -2.0])  # right, tie (counts as wrong), wrong, right
    expected = {"accuracy": 0.5, "chosen_score": 1.5, "rejected_score": 0.25, "margin": 1.25}
    assert pairwise_metrics(chosen, rejected) == pytest.approx(expected)
    prediction = EvalPrediction(predictions=np.stack([chosen, rejected], axis=1), label_ids=np.zeros(4))
    assert compute_metrics(prediction) == pytest.approx(expected)


# --- truncation ----------------------------------------------------------------------------------------
def test_long_pairs_keep_both_replies_and_their_eos(demo_tokenizer):
    template = get_template("human_assistant", demo_tokenizer)
    bos, eos = demo_tokenizer.bos_token_id, demo_tokenizer.eos_token_id
    history = [Turn(f"把 {n} 逐位写成汉字", "零一二三") for n in ("1111", "2222", "3333")]
    pair = PreferencePair("把 4071 逐位写成汉字" * 3, "四零七一", "四零七一二三四五六七八九", history, system="系统")
    full = encode_pair(template, pair, None).sequences
    chosen_reply = template.encode_turns(pair.conversation(pair.chosen))[-1][1]
    rejected_reply = template.encode_turns(pair.conversation(pair.rejected))[-1][1]
    assert chosen_reply[-1] == rejected_reply[-1] == eos

    for max_len in (len(full[1]) - 5, 60, 40, len(rejected_reply) + 2):
        encoded = encode_pair(template, pair, max_len)
        chosen, rejected = encoded.sequences
        assert encoded.truncated and max(len(chosen), len(rejected)) <= max_len
        assert chosen[-len(chosen_reply) :] == chosen_reply and rejected[-len(rejected_reply) :] == rejected_reply
        assert chosen[0] == rejected[0] == bos  # BOS survives, the prompt is cut after it
        # both sides are judged against the same (cut) prompt
        assert chosen[: -len(chosen_reply)] == rejected[: -len(rejected_reply)]

    # whole turns go first: with room for the last turn and one earlier one, the oldest two are gone
    one_back = Conversation([history[-1], Turn(pair.prompt, pair.rejected)], system="系统")
    expected = [t for p, r in template.encode_turns(one_back) for t in p + r]
    assert encode_pair(template, pair, len(expected)).sequences[1] == expected
    assert encode_pair(template, pair, len(rejected_reply) + 1) is None  # no prompt token fits: dropped


def test_dry_run_reports_skipped_and_too_long_pairs(tmp_path, tiny_llama_dir):
    rows = DEMO_PAIRS[:6] + [
        {"prompt": "把 1234 逐位写成汉字", "chosen": "一二三四", "rejected": "一二三四"},  # chosen == rejected
        {"prompt": "把 1234 逐位写成汉字", "chosen": "一二三四", "rejected": "  "},  # empty side
        {"prompt": "把 1234 逐位写成汉字", "chosen": "一二三四" * 20, "rejected": "五"},  # reply alone too long
    ]
    out = tmp_path / "dry"
    args = {
        "model_name_or_path": str(tiny_llama_dir),
        "train_file": write_jsonl(tmp_path / "pairs.jsonl", rows),
        "max_seq_length": 48,
        "output_dir": str(out),
        "data_cache_dir": str(tmp_path / "cache"),
        "dry_run": True,
    }
    assert train_rm.main(["--train_args_file", write_args(tmp_path, "dry", **args)]) is None
    report = json.loads((out / "data_report.json").read_text())
    source = report["sources"][0]
    assert source["read"] == 9 and source["kept"] == 6
    assert source["skipped"] == {"chosen_equals_rejected": 1, "empty_rejected": 1, "pair_too_long": 1}
    assert report["examples"] == 6 and "label_tokens" not in report
    preview = [json.loads(line) for line in (out / "data_preview.jsonl").read_text().splitlines()]
    assert len(preview) == 6 and set(preview[0]) == {"chosen_input_ids", "rejected_input_ids"}
    assert all(p["chosen_input_ids"][-1] == p["rejected_input_ids"][-1] == 2 for p in preview)  # </s>


# --- packing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row_tokens", [96, None], ids=["rows-of-96", "one-flat-row"])
def test_packed_scores_equal_padded_scores(tiny_llama_dir, demo_tokenizer, row_tokens):
    from component.config.training import RewardArguments
    from component.model.loader import attach_lora

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_llama_dir, num_labels=1, pad_token_id=demo_tokenizer.pad_token_id
    )
    args = RewardArguments(model_name_or_path=str(tiny_llama_dir), train_file="unused", lora_rank=4)
    model = attach_lora(
        model, args, "seq_cls", modules_to_save=["score"]
    ).eval()  # the head reached through peft's wrapper
    template = get_template("human_assistant", demo_tokenizer)
    features = []
    for i, row in enumerate(DEMO_PAIRS[:5]):
        pair = PreferencePair(row["prompt"] + "，谢谢" * i, row["chosen"], row["rejected"] + "零" * (i % 3))
        chosen, rejected = encode_pair(template, pair, None).sequences
        features.append({"chosen_input_ids": chosen, "rejected_input_ids": rejected})
    padded = PairCollator(demo_tokenizer.pad_token_id)(features)
    packed = PairCollator(demo_tokenizer.pad_token_id, packing=True, row_tokens=row_tokens)(features)
    assert "attention_mask" not in packed and (packed["input_ids"].shape[0] == 1) == (row_tokens is None)
    assert (packed["position_ids"] == 0).sum() >= 10  # positions restart at each of the 10 sequences
    with torch.no_grad():
        from_padded = sequence_scores(model, padded["input_ids"], padded["attention_mask"])
        from_packed = sequence_scores(
            model, packed["input_ids"], position_ids=packed["position_ids"], score_index=packed["score_index"]
        )
    torch.testing.assert_close(from_packed, from_padded, rtol=0, atol=1e-5)


# --- QLoRA training, reload, score CLI --------------------------------------------------------------
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("rm_qlora")
    # An easy preference (a right answer over a refusal), so that a few steps visibly lower the loss.
    rows = [{**row, "rejected": "我不知道"} for row in DEMO_PAIRS[:80]]
    eval_rows = rows[64:]
    args = {
        "model_name_or_path": str(tiny_llama_dir),
        "train_file": write_jsonl(tmp / "train.jsonl", rows[:64]),
        "eval_file": write_jsonl(tmp / "eval.jsonl", eval_rows),
        "max_seq_length": 64,
        "finetuning_type": "qlora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 3e-3,
        "max_steps": 12,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "tensorboard",
        "output_dir": str(tmp / "out"),
        "data_cache_dir": str(tmp / "cache"),
        "seed": 3,
        # Padded, as the scorer batches: 4-bit CPU kernels round differently for other batch shapes (~1e-3),
        # and this test compares scores to 1e-4. Packed == padded is tested in fp32 above.
        "packing": False,
    }
    trainer = train_rm.main(["--train_args_file", write_args(tmp, "qlora", **args)])
    return trainer, Path(args["output_dir"]), eval_rows


@pytest.mark.slow
def test_qlora_reward_model_trains_and_reports_pairwise_metrics(qlora_run):
    trainer, out, _ = qlora_run
    base = trainer.model.get_base_model()
    assert any("Linear4bit" in type(m).__name__ for m in base.modules()), "weights were not loaded in 4-bit"
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert np.mean(losses[-4:]) < np.mean(losses[:2]) / 2, losses  # a broken gradient path stays near log 2
    results = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_accuracy", "eval_chosen_score", "eval_rejected_score", "eval_margin"):
        assert math.isfinite(results[key]), key
    assert results["eval_margin"] == pytest.approx(results["eval_chosen_score"] - results["eval_rejected_score"])
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_loss.png"):
        assert (out / name).is_file(), name
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard logs"


@pytest.mark.slow
def test_saved_head_and_adapter_reload_to_the_training_time_scores(qlora_run, tiny_llama_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    trainer, out, eval_rows = qlora_run
    saved = load_file(out / "adapter_model.safetensors")
    assert any("score" in key for key in saved), "the score head was not saved with the adapter"

    # Our loader + scorer reproduce the scores measured at the end of training.
    model, tokenizer, template_name = load_reward_model(str(out), quantization="4bit")
    assert template_name == "human_assistant"
    pairs = [PreferencePair.from_dict({**row, "history": []}) for row in eval_rows]
    chosen = score_conversations(model, tokenizer, template_name, [p.conversation(p.chosen) for p in pairs])
    rejected = score_conversations(model, tokenizer, template_name, [p.conversation(p.rejected) for p in pairs])
    results = json.loads((out / "eval_results.json").read_text())
    metrics = pairwise_metrics(np.array(chosen), np.array(rejected))
    assert metrics["chosen_score"] == pytest.approx(results["eval_chosen_score"], abs=1e-4)
    assert metrics["rejected_score"] == pytest.approx(results["eval_rejected_score"], abs=1e-4)
    assert metrics["accuracy"] == results["eval_accuracy"]

    # Plain transformers + peft (the README snippet): right padding, pad != eos -> the same scores.
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_llama_dir, num_labels=1, quantization_config=quantization_config("4bit"), dtype=torch.float32
    )
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    template = get_template("human_assistant", tokenizer)
    ids = [encode_pair(template, p, None).sequences[0] for p in pairs]
    batch = PairCollator(tokenizer.pad_token_id)([{"chosen_input_ids": s, "rejected_input_ids": s} for s in ids])
    with torch.no_grad():
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    np.testing.assert_allclose(logits[: len(ids)].numpy(), chosen, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_score_cli_writes_one_scored_row_per_input(qlora_run, tmp_path):
    _, out, eval_rows = qlora_run
    rows = [{"prompt": r["prompt"], "response": r["chosen"], "id": i} for i, r in enumerate(eval_rows[:5])]
    rows.append({"prompt": "再写一个", "response": "一二", "history": [["把 1234 逐位写成汉字", "一二三四"]]})
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    target = tmp_path / "scores" / "out.jsonl"
    generate.main(
        ["score", "--reward_model", str(out), "--input", source, "--output", str(target), "--quantization", "4bit"]
    )
    written = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in w.items() if k != "score"} for w in written] == rows
    assert all(isinstance(w["score"], float) and math.isfinite(w["score"]) for w in written)
    model, tokenizer, template_name = load_reward_model(str(out), quantization="4bit")
    conversations = [Conversation([Turn(r["prompt"], r["response"])]) for r in rows[:5]]
    expected = score_conversations(model, tokenizer, template_name, conversations, batch_size=2)
    np.testing.assert_allclose([w["score"] for w in written[:5]], expected, rtol=0, atol=1e-5)


# --- gradient accumulation and resume ----------------------------------------------------------------
@pytest.fixture()
def small_run(tmp_path, tiny_llama_dir):
    def run(name: str, callbacks=None, **overrides) -> Path:
        args = {
            "model_name_or_path": str(tiny_llama_dir),
            "train_file": write_jsonl(tmp_path / "train.jsonl", DEMO_PAIRS[:48]),
            "max_seq_length": 64,
            "lora_rank": 4,
            "lora_dropout": 0.0,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_strategy": "steps",
            "save_steps": 3,
            "report_to": "none",
            "output_dir": str(tmp_path / name),
            "data_cache_dir": str(tmp_path / "cache"),
            "seed": 5,
            **overrides,
        }
        train_rm.main(["--train_args_file", write_args(tmp_path, name, **args)], callbacks=callbacks)
        return tmp_path / name

    return run


def adapter_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output_dir / "adapter_model.safetensors")


@pytest.mark.slow
def test_gradient_accumulation_averages_like_one_big_batch(small_run):
    """One SGD step on 4 pairs at once equals one step on 2 x 2 accumulated pairs (same first 4 pairs)."""
    common = {"max_steps": 1, "optim": "sgd", "learning_rate": 1.0, "save_strategy": "no", "max_grad_norm": 0.0}
    whole = adapter_weights(small_run("whole", **common))
    accumulated = adapter_weights(
        small_run("accumulated", **common, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    )
    assert whole.keys() == accumulated.keys()
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_after_a_stop_matches_an_uninterrupted_run(small_run):
    from tests.utils import StopAfterStepCallback

    straight = small_run("straight", max_steps=6)
    small_run("resumed", callbacks=[StopAfterStepCallback(3)], max_steps=6)
    resumed = small_run("resumed", max_steps=6, resume_from_checkpoint=True)
    a, b = adapter_weights(straight), adapter_weights(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


# --- the shipped configs ----------------------------------------------------------------------------
@pytest.mark.slow
def test_baichuan_13b_qlora_config_dry_run_and_two_steps(tmp_path, baichuan_13b_folder, fixtures_dir):
    data = fixtures_dir / "datasets" / "rlhf-reward-single-round-trans_chinese.handmade.parquet"
    args_file = shipped_config("rm", "lora_config.json", tmp_path, baichuan_13b_folder, data)
    train_rm.main(["--train_args_file", args_file, "--dry_run", "true"])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    assert report["sources"][0]["format"] == "prompt_chosen_rejected" and report["examples"] == 4
    overrides = ["--max_steps", "2", "--bf16", "false", "--optim", "adamw_torch", "--gradient_checkpointing", "true"]
    trainer = train_rm.main(["--train_args_file", args_file, *overrides, "--report_to", "none"])
    assert type(trainer.model.get_base_model()).__name__ == "BaichuanForSequenceClassification"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "eval_accuracy" in json.loads((tmp_path / "out" / "eval_results.json").read_text())


@pytest.mark.slow
def test_hh_rlhf_qwen_config_dry_run(tmp_path, tiny_llama_dir, fixtures_dir):
    data = fixtures_dir / "datasets" / "hh-rlhf.handmade.jsonl.gz"
    train_rm.main(["--train_args_file", shipped_config("rm", "hh_rlhf_qwen.json", tmp_path, tiny_llama_dir, data)])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    assert [s["format"] for s in report["sources"]] == ["hh_rlhf", "hh_rlhf"]
    assert report["examples"] == 12  # 6 pairs, listed twice
    preview = json.loads((tmp_path / "out" / "data_preview.jsonl").read_text().splitlines()[0])
    text = load_tokenizer(str(tiny_llama_dir)).decode(preview["chosen_input_ids"])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")  # the chat template's turn end


def test_a_16_bit_model_trains_its_score_head_in_fp32(tiny_llama_dir, demo_tokenizer):
    from component.config.training import RewardArguments
    from component.model.loader import attach_lora
    from component.model.reward_head import train_score_head_in_fp32

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_llama_dir, num_labels=1, pad_token_id=demo_tokenizer.pad_token_id, dtype=torch.bfloat16
    )
    args = RewardArguments(model_name_or_path=str(tiny_llama_dir), train_file="unused", lora_rank=4)
    model = attach_lora(model, args, "seq_cls", modules_to_save=["score"])
    train_score_head_in_fp32(model)
    trained = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    ids = torch.tensor([encode_pair(get_template("human_assistant", demo_tokenizer), PAIR, None).sequences[0]])
    scores = sequence_scores(model, ids, torch.ones_like(ids))
    pairwise_loss(scores, scores.detach() + 1).backward()
    assert scores.dtype == torch.float32 and all(p.grad is not None for p in trained)


def test_reward_keys_are_validated_like_sft_keys(tiny_llama_dir, tmp_path):
    from component.config.parser import ConfigError
    from component.config.training import RewardArguments, build_arguments

    raw = {"model_name_or_path": str(tiny_llama_dir), "train_file": write_jsonl(tmp_path / "t.jsonl", DEMO_PAIRS[:2])}
    args, _ = build_arguments({**raw, "output_dir": str(tmp_path), "margin": 0.5}, ours=RewardArguments)
    assert args.margin == 0.5
    with pytest.raises(ConfigError, match="Did you mean 'margin'"):
        build_arguments({**raw, "output_dir": str(tmp_path), "margn": 0.5}, ours=RewardArguments)
    with pytest.raises(ConfigError, match="margin"):
        build_arguments({**raw, "output_dir": str(tmp_path)}, {"margin": "wide"}, ours=RewardArguments)
