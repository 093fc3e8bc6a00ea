"""The chunked LM head + loss (train.lm_head) against the model's own forward + loss.

Loss and gradients (every weight for full fine-tuning, the LoRA weights for LoRA / QLoRA) must equal the
model's path to float tolerance for Llama (untied and tied embeddings) and our Baichuan (13B ALiBi, 7B RoPE,
Baichuan2 NormHead + z-loss), on padded and packed batches, with chunks smaller than the label count; the
head must only ever see chunk-sized slices of label positions. Gradient accumulation and DDP through the
Trainer are in test_loss_normalisation.py (both paths).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from component.data.collators import PackingCollator, PaddingCollator
from component.data.template import IGNORE_INDEX
from component.train.lm_head import (
    ChunkSize,
    OutputHead,
    causal_lm_loss,
    decoder_hidden_states,
    label_positions,
    token_logprobs,
)

VOCAB = 300
CHUNK = 7  # far fewer than the label positions below: several chunks, a ragged last one
SHAPES = [(5, 9), (12, 4), (3, 17), (8, 1)]  # (prompt, reply) tokens


def rows(seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for prompt, reply in SHAPES:
        ids = torch.randint(3, VOCAB, (prompt + reply,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": len(ids)})
    return out


def llama(tied: bool, hidden: int = 32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        use_cache=False,  # as load_model sets it: packed rows are then read from the position_ids restarts
    )
    return LlamaForCausalLM(config)


def baichuan(alibi: bool, norm_head: bool, z_loss: float = 0.0, hidden: int = 40) -> nn.Module:
    from component.model.baichuan import BaichuanConfig, BaichuanForCausalLM

    values = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": hidden // 8 if hidden < 64 else hidden // 16,
        "model_max_length": 64,
        "initializer_range": 0.2,
        "use_cache": False,
    }
    if not alibi:
        values["max_position_embeddings"] = 64
    if norm_head:
        values["z_loss_weight"] = z_loss
    config = BaichuanConfig(**values)
    assert config.use_alibi is alibi and config.use_norm_head is norm_head
    return BaichuanForCausalLM(config)


MODELS = {
    "llama untied": lambda: llama(tied=False),
    "llama tied": lambda: llama(tied=True),
    "baichuan-13b alibi": lambda: baichuan(alibi=True, norm_head=False),
    "baichuan2-7b rope normhead z-loss": lambda: baichuan(alibi=False, norm_head=True, z_loss=0.01),
    "baichuan2-13b alibi normhead": lambda: baichuan(alibi=True, norm_head=True),
}
BATCHES = {"padded": PaddingCollator(0), "packed": PackingCollator(0, 40)}


def with_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # Random B (not PEFT's zeros) so every LoRA weight has a gradient to compare.
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, config)


def model_path(model: nn.Module, batch: dict, num_items) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, num_items_in_batch=num_items).loss
    loss.backward()
    return loss.detach(), gradients(model)


def chunked_path(model: nn.Module, batch: dict, num_items, chunk: int = CHUNK) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = causal_lm_loss(decoder_hidden_states(model, inputs), batch["labels"], OutputHead.of(model), num_items, chunk)
    loss.backward()
    return loss.detach(), gradients(model)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: tuple, b: tuple, atol: float = 1e-6, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=atol, rtol=rtol, msg=name)


def label_count(batch: dict) -> torch.Tensor:
    return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()


@pytest.mark.parametrize("batching", list(BATCHES))
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_loss_and_gradients_equal_the_models_path(name, batching, tuning):
    torch.manual_seed(0)
    model = MODELS[name]()
    if tuning == "lora":
        model = with_lora(model)
    batch = BATCHES[batching](rows())
    if batching == "packed":
        assert batch["input_ids"].shape[0] > 1  # several packed rows, examples starting mid-row
    for num_items in (label_count(batch), None):  # the Trainer's step count, and a plain per-batch mean
        expected = model_path(model, batch, num_items)
        got = chunked_path(model, batch, num_items)
        assert_same(got, expected)
    if tuning == "full":
        assert "lm_head.weight" in got[1] or "model.embed_tokens.weight" in got[1]
        assert len(got[1]) == len(list(model.parameters()))
    else:
        assert all("lora_" in n for n in got[1])


def test_the_comparison_can_fail():
    """A head off by one position (labels unshifted) is caught by the same comparison."""
    torch.manual_seed(0)
    model = llama(tied=False)
    batch = PaddingCollator(0)(rows())
    expected = model_path(model, batch, label_count(batch))
    shifted = {**batch, "labels": torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)}
    with pytest.raises(AssertionError):
        assert_same(chunked_path(model, shifted, label_count(batch)), expected)


QLORA_MODELS = {  # bitsandbytes' CPU 4-bit kernels want rows of a multiple of 64
    "llama untied": lambda: llama(tied=False, hidden=64),
    "baichuan2-7b rope normhead z-loss": lambda: baichuan(alibi=False, norm_head=True, z_loss=0.01, hidden=64),
}


@pytest.mark.parametrize("name", list(QLORA_MODELS))
def test_qlora_4bit_base_gives_the_models_loss_and_lora_gradients(tmp_path, name):
    from component.config.training import FinetuneArguments
    from component.model.loader import load_model

    torch.manual_seed(0)
    QLORA_MODELS[name]().save_pretrained(tmp_path)
    args = FinetuneArguments(
        model_name_or_path=str(tmp_path), train_file="unused", finetuning_type="qlora", lora_rank=4, lora_dropout=0.0
    )
    model = load_model(args, gradient_checkpointing=False)
    assert any("4bit" in type(m).__name__ for m in model.modules())
    batch = PackingCollator(0, 40)(rows())
    expected = model_path(model, batch, label_count(batch))
    got = chunked_path(model, batch, label_count(batch))
    assert_same(got, expected)
    assert any(g.abs().sum() > 0 for g in got[1].values())


def test_bf16_upcasts_per_chunk():
    torch.manual_seed(0)
    model = llama(tied=False).to(torch.bfloat16)
    batch = PaddingCollator(0)(rows())
    expected, got = model_path(model, batch, label_count(batch)), chunked_path(model, batch, label_count(batch))
    assert got[0].dtype == torch.float32
    assert_same(got, expected, atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["llama untied", "baichuan2-13b alibi normhead"])
def test_the_head_only_sees_chunks_of_label_positions(name):
    """Never [positions x vocabulary]: every head call gets at most `chunk` label positions, and together they
    cover the label positions exactly once (the loss differentiates each chunk in its forward: no recompute)."""
    torch.manual_seed(0)
    model = MODELS[name]()
    batch = PaddingCollator(0)(rows())
    seen: list[int] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[:-1].numel()))
    try:
        chunked_path(model, batch, label_count(batch), chunk=5)
    finally:
        handle.remove()
    # The model's forward runs its head on no position at all (logits_to_keep = none).
    assert seen[0] == 0
    chunks = [n for n in seen if n]
    assert max(chunks) <= 5
    assert sum(chunks) == int(label_count(batch))


def test_token_logprobs_equal_log_softmax_and_their_gradients():
    torch.manual_seed(0)
    model = with_lora(baichuan(alibi=False, norm_head=True))
    batch = PackingCollator(0, 40)(rows())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    weights = torch.rand(int(label_count(batch)))  # a per-token weighting, as DPO / RL apply

    model.zero_grad()
    logits = model(**inputs).logits
    hidden, targets, mask = label_positions(logits, batch["labels"])
    expected = torch.log_softmax(hidden.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    (expected * weights).sum().backward()
    expected_grads = gradients(model)

    model.zero_grad()
    hidden, targets, mask2 = label_positions(decoder_hidden_states(model, inputs), batch["labels"])
    got = token_logprobs(hidden, targets, OutputHead.of(model), chunk_size=CHUNK)
    (got * weights).sum().backward()
    assert torch.equal(mask, mask2) and got.shape == targets.shape
    assert_same((got.detach(), gradients(model)), (expected.detach(), expected_grads))


def test_logit_scale_and_softcap_follow_the_config():
    model = llama(tied=False)
    model.config.logit_scale = 0.5
    model.config.final_logit_softcapping = 3.0
    head = OutputHead.of(model)
    hidden = torch.randn(4, 32)
    expected = torch.tanh(model.lm_head(hidden) * 0.5 / 3.0) * 3.0
    torch.testing.assert_close(head.logits(hidden), expected)


def test_lora_on_the_output_head_is_used():
    """lm_head in target_modules: the head is called as the model calls it, LoRA branch included."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["lm_head", "q_proj"], lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(llama(tied=False), config)
    batch = PaddingCollator(0)(rows())
    got = chunked_path(model, batch, label_count(batch))
    assert any("lm_head.lora" in n for n in got[1])
    assert_same(got, model_path(model, batch, label_count(batch)))


def test_sft_trainer_eval_loss_is_the_models(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from component.train.sft import SFTTrainer

    torch.manual_seed(0)
    model = baichuan(alibi=False, norm_head=True, z_loss=0.01)
    data = Dataset.from_list(rows())
    losses = {}
    for path in ("model", "chunked"):
        args = TrainingArguments(
            output_dir=str(tmp_path / path),
            per_device_eval_batch_size=3,
            report_to="none",
            use_cpu=True,
            remove_unused_columns=False,
        )
        trainer = SFTTrainer(
            model=model, args=args, eval_dataset=data, data_collator=PackingCollator(0), logits_path=path
        )
        seen: list[int] = []
        handle = model.lm_head.register_forward_hook(lambda _m, a, _o, seen=seen: seen.append(a[0].shape[:-1].numel()))
        losses[path] = trainer.evaluate()["eval_loss"]
        handle.remove()
        # The chunked path runs the model's head on no position, then on label positions only.
        assert (0 in seen) is (path == "chunked")
    assert losses["chunked"] == pytest.approx(losses["model"], rel=1e-5)


def test_keys_are_checked(tmp_path, tiny_llama_dir):
    from component.config.parser import ConfigError
    from component.config.training import build_arguments

    data = tmp_path / "train.jsonl"
    data.write_text('{"kind": "k", "input": "q", "target": "a"}\n', encoding="utf-8")
    base = {"model_name_or_path": str(tiny_llama_dir), "train_file": str(data), "output_dir": str(tmp_path / "o")}
    args, _ = build_arguments(base)
    assert (args.logits_path, args.logits_chunk_size) == ("chunked", 1024)
    with pytest.raises(ConfigError, match=r"'logits_path' must be one of \"chunked\", \"model\""):
        build_arguments({**base, "logits_path": "fused"})
    with pytest.raises(ConfigError, match="'logits_chunk_size' must be positive"):
        build_arguments({**base, "logits_chunk_size": 0})
    with pytest.raises(ConfigError, match="'label_smoothing_factor'.*set 'logits_path' to \"model\""):
        build_arguments({**base, "label_smoothing_factor": 0.1})
    build_arguments({**base, "label_smoothing_factor": 0.1, "logits_path": "model"})


# --- chunks sized by a memory budget ------------------------------------------------------------------------------
def budget_of(rows: float) -> float:
    """The `mib` of `rows` rows of fp32 logits over VOCAB."""
    return rows * VOCAB * 4 / 2**20


def test_chunk_rows_follow_the_budget():
    assert ChunkSize() == ChunkSize(1024, 256)
    assert ChunkSize().rows_for(125_696) == 533  # 256 MiB / (125,696 x 4 bytes)
    assert ChunkSize().rows_for(151_936) == 441
    assert ChunkSize().rows_for(64_000) == 1024  # 1,048 rows fit: the row cap holds
    assert ChunkSize(1024, 128).rows_for(151_936) == 220
    assert ChunkSize(1024, None).rows_for(151_936) == 1024
    assert ChunkSize(1024, 1e-9).rows_for(300) == 1  # less than one row: one row
    assert OutputHead(nn.Linear(8, 300)).rows(ChunkSize(1024, budget_of(3.5))) == 3
    assert OutputHead(nn.Linear(8, 300)).rows(7) == 7  # an int: rows, within the default MiB
    with pytest.raises(ValueError, match="logits_chunk_mib"):
        ChunkSize(1024, 0)


@pytest.mark.parametrize("per_chunk", [1, 3.5])  # a budget below one row of logits; one of 3 rows and a half
@pytest.mark.parametrize("batching", list(BATCHES))
@pytest.mark.parametrize("name", list(MODELS))
def test_budget_chunks_give_the_models_loss_and_gradients(name, batching, per_chunk):
    """Chunks cut by the MiB budget, down to one row, against the model's path; the head sees no more rows."""
    torch.manual_seed(0)
    model = with_lora(MODELS[name]())
    batch = BATCHES[batching](rows())
    chunk = ChunkSize(1024, budget_of(per_chunk) if per_chunk > 1 else 1e-9)
    seen: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].shape[:-1].numel())
    )
    try:
        got = chunked_path(model, batch, label_count(batch), chunk)
    finally:
        handle.remove()
    assert seen[0] == 0 and max(seen) == int(per_chunk) and sum(seen) == int(label_count(batch))
    assert_same(got, model_path(model, batch, label_count(batch)))


class SavesItsOutput(nn.Module):
    """A head whose backward reads its own output (sigmoid): the in-place gradient must not overwrite it."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, vocab, bias=False)
        self.out_features = vocab

    def forward(self, hidden):
        return torch.sigmoid(self.linear(hidden))  # autograd keeps this very tensor for its backward


HEADS = {
    "linear": lambda: OutputHead(nn.Linear(16, 50, bias=False)),
    "scale + softcap + z-loss": lambda: OutputHead(
        nn.Linear(16, 50, bias=False), scale=0.5, softcap=2.0, z_loss_weight=0.01
    ),
    "temperature": lambda: OutputHead(nn.Linear(16, 50, bias=False), temperature=0.7),
    "backward reads the output": lambda: OutputHead(SavesItsOutput(16, 50)),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_in_place_gradients_equal_autograd_through_full_logits(name):
    """Loss and log-probs (and their gradients for the hidden states and the head) against autograd on full
    logits, chunks of 1 and 4 rows (a ragged last one)."""
    torch.manual_seed(0)
    head = HEADS[name]()
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    weights = torch.rand(23)
    parameters = [hidden, *head.module.parameters()]

    def full() -> tuple[torch.Tensor, torch.Tensor]:
        logits = head.logits(hidden)
        loss = F.cross_entropy(logits, targets, reduction="sum") / 23
        loss = loss + head.z_loss_weight * logits.max(-1).values.pow(2).sum() / 23
        return loss, torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)

    loss, logprobs = full()
    expected = [loss.detach(), *torch.autograd.grad(loss, parameters, retain_graph=True)]
    expected_logprobs = [logprobs.detach(), *torch.autograd.grad((logprobs * weights).sum(), parameters)]
    labels = F.pad(targets, (1, 0), value=IGNORE_INDEX)[None]  # position t predicts labels[t + 1]
    for rows in (1, 4):
        chunk = ChunkSize(rows, None)
        loss = causal_lm_loss(F.pad(hidden, (0, 0, 0, 1))[None], labels, head, None, chunk)
        for a, b in zip([loss.detach(), *torch.autograd.grad(loss, parameters)], expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        logprobs = token_logprobs(hidden, targets, head, chunk)
        got = [logprobs.detach(), *torch.autograd.grad((logprobs * weights).sum(), parameters)]
        for a, b in zip(got, expected_logprobs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_log_prob_backward_replays_the_heads_dropout():
    """LoRA with dropout on the head: the backward's recomputed chunks draw the forward's dropout masks."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.5, init_lora_weights=False)
    model = get_peft_model(llama(tied=False), config).train()
    head = OutputHead.of(model)
    hidden = torch.randn(11, 32, requires_grad=True)
    targets = torch.randint(0, VOCAB, (11,))
    parameters = [hidden] + [p for p in head.module.parameters() if p.requires_grad]

    torch.manual_seed(1)  # the oracle: the same chunks in the same order, through plain autograd
    logprobs = torch.cat([torch.log_softmax(head.logits(hidden[s : s + 4]), -1) for s in range(0, 11, 4)])
    logprobs = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    expected = [logprobs.detach(), *torch.autograd.grad(logprobs.sum(), parameters)]
    torch.manual_seed(1)
    logprobs = token_logprobs(hidden, targets, head, ChunkSize(4, None))
    torch.rand(1)  # the random state moves on before backward, as a training step's would
    got = [logprobs.detach(), *torch.autograd.grad(logprobs.sum(), parameters)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_log_prob_backward_replays_autocast():
    """Under bf16 autocast the recomputed chunks are bf16 matmuls again, as in the forward (the oracle: the same
    chunks through plain autograd under autocast)."""
    torch.manual_seed(0)
    head = OutputHead(nn.Linear(16, 50, bias=False).requires_grad_(False))  # frozen, as under LoRA
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    parameters = [hidden]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = torch.cat([torch.log_softmax(head.logits(hidden[s : s + 4]), -1) for s in range(0, 23, 4)])
        logprobs = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        expected = [logprobs.detach(), *torch.autograd.grad(logprobs.sum(), parameters)]
        logprobs = token_logprobs(hidden, targets, head, ChunkSize(4, None))
    got = [logprobs.detach(), *torch.autograd.grad(logprobs.sum(), parameters)]  # backward outside autocast
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_logits_chunk_mib_is_checked(tmp_path, tiny_llama_dir):
    from component.config.parser import ConfigError
    from component.config.training import build_arguments

    data = tmp_path / "train.jsonl"
    data.write_text('{"kind": "k", "input": "q", "target": "a"}\n', encoding="utf-8")
    base = {"model_name_or_path": str(tiny_llama_dir), "train_file": str(data), "output_dir": str(tmp_path / "o")}
    assert build_arguments(base)[0].logits_chunk_mib == 256
    assert build_arguments({**base, "logits_chunk_mib": None})[0].logits_chunk_mib is None
    assert build_arguments({**base, "logits_chunk_mib": 32.5})[0].logits_chunk_mib == 32.5
    with pytest.raises(ConfigError, match="'logits_chunk_mib' must be positive or null"):
        build_arguments({**base, "logits_chunk_mib": 0})
