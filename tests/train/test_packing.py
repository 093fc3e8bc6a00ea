"""Padding-free packing: layout, exact loss and gradients against one-example-at-a-time, no cross-example leaks.

The equality tests run a handful of examples of very different lengths (1 to 150 tokens) through a packed
batch and through the model one at a time, weighting each example by its label tokens; the packed loss and
every gradient must match to float tolerance. The same holds for the native Baichuan model (ALiBi and RoPE)
and for QLoRA (4-bit base, LoRA gradients).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from component.config.parser import ConfigError
from component.config.training import build_arguments
from component.data.collators import PackingCollator, PaddingCollator, pack_rows
from component.data.conversation import Conversation, Turn
from component.data.template import IGNORE_INDEX, get_template
from component.model.packed_attention import SEGMENT_ATTENTION
from component.train.batching import (
    Batching,
    attends_per_sequence,
    make_collator,
    packed_attention,
    packing_row_tokens,
    resolve_batching,
    use_packing,
)
from tests.utils import FIXTURES

# (prompt tokens, reply tokens): very different lengths, one example with a single label token, one trained from
# its first token (train_on_prompt), whose first label a packed row must not predict from the example before it.
SHAPES = [(3, 1), (40, 110), (5, 12), (70, 9), (0, 31), (12, 2)]
BAICHUAN_REF = FIXTURES / "baichuan_ref"


def make_examples(vocab_size: int, shapes=SHAPES, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for prompt, reply in shapes:
        ids = torch.randint(4, vocab_size, (prompt + reply,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def label_tokens(labels: list[int]) -> int:
    return sum(label != IGNORE_INDEX for label in labels[1:])  # labels[0] is never predicted


def reference_loss_and_grads(model, examples: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """Each example alone; the loss is the label-token-weighted mean, as one batch of all of them must give."""
    model.zero_grad()
    total = sum(label_tokens(e["labels"]) for e in examples)
    loss_sum = 0.0
    for example in examples:
        n = label_tokens(example["labels"])
        out = model(
            input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]]), use_cache=False
        )
        (out.loss * n / total).backward()
        loss_sum += out.loss.item() * n
    return loss_sum / total, grads(model)


def batch_loss_and_grads(model, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.loss.item(), grads(model)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_loss_and_grads(model, examples: list[dict], batch: dict, atol: float = 2e-6) -> None:
    ref_loss, ref_grads = reference_loss_and_grads(model, examples)
    loss, got = batch_loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert got.keys() == ref_grads.keys() and got
    for name, grad in got.items():
        scale = ref_grads[name].abs().max().item() + 1e-12
        assert torch.allclose(grad, ref_grads[name], atol=atol * max(scale, 1.0), rtol=1e-4), name


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


# --- layout -------------------------------------------------------------------------------------------------
def test_pack_rows_places_every_example_once_within_the_budget():
    lengths = [900, 10, 500, 480, 30, 1024, 7, 300]
    rows = pack_rows(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    assert len(rows) == 4  # first-fit decreasing: 1024 | 900+30+10+7 | 500+480 | 300
    assert pack_rows(lengths, None) == [list(range(len(lengths)))]
    assert pack_rows(lengths, "longest") == rows  # the longest example here is 1024
    assert pack_rows([2000, 5], 1024) == [[0], [1]]  # longer than the budget: a row of its own


@pytest.mark.parametrize("row_tokens", [None, 160, "longest"])
def test_packed_layout_restarts_positions_and_never_predicts_across_examples(row_tokens):
    examples = make_examples(400)
    batch = PackingCollator(pad_token_id=3, row_tokens=row_tokens)(examples)
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask: segments from position_ids
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_rows(lengths, row_tokens)
    assert batch["input_ids"].shape[0] == len(rows) == {None: 1, 160: 2, "longest": 2}[row_tokens]
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            ids, labels = examples[index]["input_ids"], examples[index]["labels"]
            end = start + len(ids)
            assert batch["input_ids"][r, start:end].tolist() == ids
            assert batch["position_ids"][r, start:end].tolist() == list(range(len(ids)))
            assert batch["labels"][r, start].item() == IGNORE_INDEX  # first label: never from the previous example
            assert batch["labels"][r, start + 1 : end].tolist() == labels[1:]
            start = end
        pad = batch["position_ids"].shape[1] - start  # the pad segment: own positions from 0, no labels
        assert batch["position_ids"][r, start:].tolist() == list(range(pad))
        assert (batch["labels"][r, start:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][r, start:] == 3).all()
    total = sum(label_tokens(e["labels"]) for e in examples)
    assert (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item() == total  # what the Trainer counts


@pytest.mark.parametrize("template_name", ["human_assistant", "chat_template", "baichuan_chat"])
def test_packing_keeps_every_templates_labels(demo_tokenizer, template_name):
    template = get_template(template_name, demo_tokenizer)
    conversations = [
        Conversation([Turn("把 1234 逐位写成汉字", "一二三四")]),
        Conversation([Turn("你好", "好"), Turn("把 9 写成汉字", "九")], system="简短回答"),
        Conversation([Turn("把 0 写成汉字", "零")]),
    ]
    examples = [vars(e) for e in template.encode_batch(conversations, 256)]
    batch = PackingCollator(pad_token_id=demo_tokenizer.pad_token_id)(
        [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    )
    flat_labels = [label for label in batch["labels"][0].tolist() if label != IGNORE_INDEX]
    expected = [label for e in examples for label in e["labels"][1:] if label != IGNORE_INDEX]
    assert flat_labels == expected
    replies = demo_tokenizer.decode(flat_labels)
    assert all(reply in replies for reply in ("一二三四", "好", "九", "零"))


# --- exact equality with one example at a time ------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["one_row", "row_budget", "longest", "padded", "padded_no_mask"])
def test_batch_loss_and_grads_equal_one_example_at_a_time(tiny_llama, attn, layout):
    tiny_llama.set_attn_implementation(attn)
    examples = make_examples(tiny_llama.config.vocab_size)
    collator = {
        "one_row": PackingCollator(pad_token_id=0),
        "row_budget": PackingCollator(pad_token_id=0, row_tokens=160),
        "longest": PackingCollator(pad_token_id=0, row_tokens="longest"),
        "padded": PaddingCollator(pad_token_id=0),
        "padded_no_mask": PaddingCollator(pad_token_id=0, attention_mask=False),  # right padding: mask not needed
    }[layout]
    assert_same_loss_and_grads(tiny_llama, examples, collator(examples))


def test_packed_grads_with_gradient_checkpointing(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing recomputes only in training mode
    examples = make_examples(model.config.vocab_size)
    assert_same_loss_and_grads(model, examples, PackingCollator(pad_token_id=0, row_tokens="longest")(examples))


def test_changing_one_example_leaves_the_others_logits_unchanged(tiny_llama):
    tiny_llama.set_attn_implementation("sdpa")
    examples = make_examples(tiny_llama.config.vocab_size)
    changed = [dict(e) for e in examples]
    changed[2] = make_examples(tiny_llama.config.vocab_size, shapes=[(9, 20)], seed=5)[0]  # other tokens and length
    collator = PackingCollator(pad_token_id=0)
    with torch.no_grad():
        before = tiny_llama(**collator(examples)).logits[0]
        after = tiny_llama(**collator(changed)).logits[0]
    start_before = start_after = 0
    for old, new in zip(examples, changed):
        end_before, end_after = start_before + len(old["input_ids"]), start_after + len(new["input_ids"])
        if old is not examples[2]:
            assert torch.allclose(before[start_before:end_before], after[start_after:end_after], atol=1e-5)
        else:
            assert not torch.allclose(before[start_before:end_before][:5], after[start_after:end_after][:5])
        start_before, start_after = end_before, end_after


def test_qlora_packed_loss_and_lora_grads_equal_one_example_at_a_time(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quantization, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, param in model.named_parameters():  # LoRA B starts at zero: give it weights so A gets gradients too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    examples = make_examples(base.config.vocab_size)
    assert_same_loss_and_grads(model, examples, PackingCollator(pad_token_id=0)(examples), atol=1e-5)


@pytest.mark.parametrize("folder", ["baichuan_13b_h4", "baichuan2_7b_h4"])  # ALiBi; RoPE + NormHead
@pytest.mark.parametrize("row_tokens", [None, "longest"])
def test_baichuan_packed_loss_and_grads_equal_one_example_at_a_time(folder, row_tokens):
    from transformers import AutoModelForCausalLM

    import component.model.baichuan as baichuan

    baichuan.register_baichuan()
    model = AutoModelForCausalLM.from_pretrained(BAICHUAN_REF / folder, dtype=torch.float32)
    model.config.use_cache = False
    # Each example within the 128-token limit; one packed row (row_tokens None) is longer than that.
    examples = make_examples(model.config.vocab_size, shapes=[(3, 1), (30, 60), (5, 12), (40, 9), (0, 30)])
    assert_same_loss_and_grads(model, examples, PackingCollator(pad_token_id=0, row_tokens=row_tokens)(examples))


# --- the batching rule ------------------------------------------------------------------------------------------
def _args(tmp_path: Path, tiny_llama_dir, **values):
    data = tmp_path / "train.jsonl"
    data.write_text('{"input": "q", "target": "a"}\n', encoding="utf-8")
    raw = {"model_name_or_path": str(tiny_llama_dir), "train_file": str(data), "output_dir": str(tmp_path / "out")}
    return build_arguments({**raw, "report_to": "none", **values})


class _FlashModel:
    class config:  # noqa: N801  (stands in for a PretrainedConfig)
        _attn_implementation = "flash_attention_2"


def test_default_without_a_varlen_kernel_is_one_flat_row_attended_per_sequence(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)  # SDPA, as load_model loads
    args, training_args = _args(tmp_path, tiny_llama_dir)
    assert (args.packing, args.group_by_length, args.packed_attention) == (None, False, None)
    assert packed_attention(args, model) == "segments"
    assert use_packing(args, training_args, model) is True
    assert model.config._attn_implementation == SEGMENT_ATTENTION  # switched by use_packing
    assert training_args.train_sampling_strategy == "random"  # the same examples per step as padded batches
    collator = make_collator(args, training_args, _Tokenizer(), True, model)
    assert isinstance(collator, PackingCollator) and collator.row_tokens is None
    examples = make_examples(100)
    batch = collator(examples)
    assert batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))  # no padding at all
    assert attends_per_sequence(model)


def test_packed_attention_mask_keeps_rows_of_the_longest_example(tmp_path, tiny_llama_dir, tiny_llama):
    tiny_llama.set_attn_implementation("sdpa")
    args, training_args = _args(tmp_path, tiny_llama_dir, packed_attention="mask")
    assert use_packing(args, training_args, tiny_llama) is True
    assert tiny_llama.config._attn_implementation == "sdpa"  # not switched
    collator = make_collator(args, training_args, _Tokenizer(), True, tiny_llama)
    assert isinstance(collator, PackingCollator) and collator.row_tokens == "longest"
    examples = make_examples(100)
    batch = collator(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape[1] == longest  # never wider than the same batch padded
    assert batch["input_ids"].numel() < len(examples) * longest
    args, _ = _args(tmp_path, tiny_llama_dir, packed_attention="mask", packing_row_tokens=256)
    assert packing_row_tokens(args, tiny_llama) == 256


def test_packed_attention_segments_names_why_a_model_cannot(tmp_path, tiny_llama_dir, tiny_llama):
    args, _ = _args(tmp_path, tiny_llama_dir, packed_attention="segments")
    tiny_llama.config._attn_implementation_internal = "flex_attention"
    try:
        with pytest.raises(ConfigError, match="packed_attention: 'segments' cannot run here: .*flex_attention"):
            packed_attention(args, tiny_llama)
        args, _ = _args(tmp_path, tiny_llama_dir)
        assert packed_attention(args, tiny_llama) == "mask"  # null: the fastest exact path it has
    finally:
        tiny_llama.set_attn_implementation("sdpa")
    with pytest.raises(ConfigError, match="packed_attention"):
        _args(tmp_path, tiny_llama_dir, packed_attention="flat")


def test_default_with_a_varlen_kernel_is_one_flat_packed_row(tmp_path, tiny_llama_dir, monkeypatch):
    args, training_args = _args(tmp_path, tiny_llama_dir, packing_row_tokens=256)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # after TrainingArguments picked its device
    batching = resolve_batching(args, training_args, _FlashModel())
    assert (batching.packing, batching.group_by_length) == (True, False)
    assert packed_attention(args, _FlashModel()) == "varlen"
    collator = make_collator(args, training_args, _Tokenizer(), True, _FlashModel())
    assert isinstance(collator, PackingCollator) and collator.row_tokens is None  # flash reads one flat row only


def test_explicit_keys_win(tmp_path, tiny_llama_dir):
    args, training_args = _args(tmp_path, tiny_llama_dir, packing=False)
    assert use_packing(args, training_args) is False
    assert training_args.train_sampling_strategy == "random"
    collator = make_collator(args, training_args, _Tokenizer(), False)
    batch = collator(make_examples(100)[:3])  # padded, right side: no mask needed (see PaddingCollator)
    assert "attention_mask" not in batch and (batch["labels"][batch["input_ids"] == 0] == IGNORE_INDEX).all()
    for keys in ({"group_by_length": True}, {"train_sampling_strategy": "group_by_length"}):
        args, training_args = _args(tmp_path, tiny_llama_dir, **keys)
        assert resolve_batching(args, training_args) == Batching(False, True, "group_by_length set in the train args")
        assert use_packing(args, training_args) is False
        assert training_args.train_sampling_strategy == "group_by_length"
    with pytest.raises(ConfigError, match="exclude each other"):
        _args(tmp_path, tiny_llama_dir, packing=True, group_by_length=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        _args(tmp_path, tiny_llama_dir, packing=True, train_sampling_strategy="group_by_length")


class _Tokenizer:
    pad_token_id = 0
