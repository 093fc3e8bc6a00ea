"""`sdpa_segments`: a packed row attends per sequence, exactly, with no cross-sequence work.

For Llama, Qwen2 (GQA, q/k/v biases, tied embeddings) and the four Baichuan variants (RoPE; ALiBi; RoPE + NormHead;
ALiBi + NormHead), full fine-tuning, LoRA and QLoRA (4-bit base): the packed batch (one flat row, and rows with a pad
segment) gives every sequence the logits it gets alone and in the padded batch (with its attention mask), and the
loss and every trainable gradient of the sequences run one at a time, label-token weighted. A spy on SDPA shows
that no call sees a query longer than the longest sequence, i.e. the row is never attended as a whole.
"""

from __future__ import annotations

import pytest
import torch

from component.data.collators import PackingCollator, PaddingCollator, pack_rows
from component.model.packed_attention import (
    SEGMENT_ATTENTION,
    packed_lengths,
    segment_attention_unsupported,
    use_segment_attention,
)
from tests.train.test_packing import assert_same_loss_and_grads, make_examples

# Each sequence within Baichuan's 128-token ALiBi limit; the flat row (~190 tokens) is longer than it.
SHAPES = [(3, 1), (30, 60), (5, 12), (40, 9), (0, 30), (12, 2)]
MODELS = ["llama", "qwen2", "baichuan_7b", "baichuan_13b", "baichuan2_7b", "baichuan2_13b"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_llama_dir):
    from tests.export.tiny_models import build_baichuan, build_qwen2

    root = tmp_path_factory.mktemp("segment_models")
    built = {"llama": tiny_llama_dir, "qwen2": build_qwen2(root / "qwen2")}
    for variant in MODELS[2:]:  # hidden 64: bitsandbytes quantizes in blocks of 64 input features
        built[variant] = build_baichuan(root / variant, variant, layers=2, hidden=64, vocab_size=1000)
    return built


def load(folder, tuning: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import component.model  # noqa: F401  (registers the native Baichuan)

    quantization = None
    if tuning == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quantization)
    model.config.use_cache = False
    # Training mode throughout: bitsandbytes repacks 4-bit weights for inference on a forward in eval mode without
    # gradients (AVX512-BF16 CPUs), after which they no longer backpropagate.
    model.train()
    if tuning == "full":
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, param in model.named_parameters():  # LoRA B starts at zero: give it weights so A gets gradients too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def logits_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def per_sequence_logits(logits: torch.Tensor, lengths: list[int], row_tokens: int | None) -> dict[int, torch.Tensor]:
    """Example index -> its logits in PackingCollator's rows (pack_rows' layout, pad segments left out)."""
    pieces = {}
    for r, row in enumerate(pack_rows(lengths, row_tokens)):
        start = 0
        for index in row:
            pieces[index] = logits[r, start : start + lengths[index]]
            start += lengths[index]
    return pieces


class SDPASpy:
    """Records the query length of every SDPA call."""

    def __init__(self, monkeypatch) -> None:
        self.lengths: list[int] = []
        original = torch.nn.functional.scaled_dot_product_attention

        def spy(query, *args, **kwargs):
            self.lengths.append(query.shape[-2])
            return original(query, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


@pytest.mark.parametrize("tuning", ["full", "lora", "qlora"])
@pytest.mark.parametrize("name", MODELS)
def test_packed_rows_attend_per_sequence_exactly(folders, name, tuning, monkeypatch):
    model = load(folders[name], tuning)
    use_segment_attention(model)
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    examples = make_examples(model.config.vocab_size, shapes=SHAPES)
    lengths = [len(e["input_ids"]) for e in examples]
    flat = PackingCollator(pad_token_id=0)(examples)
    rows = PackingCollator(pad_token_id=0, row_tokens=110)(examples)  # several rows, a pad segment in some
    padded = PaddingCollator(pad_token_id=0)(examples)  # with its attention mask: transformers' own SDPA mask path
    assert flat["input_ids"].shape == (1, sum(lengths)) and rows["input_ids"].shape[0] > 1

    alone = [logits_of(model, {"input_ids": torch.tensor([e["input_ids"]])})[0] for e in examples]
    spy = SDPASpy(monkeypatch)
    packed = per_sequence_logits(logits_of(model, flat), lengths, None)
    assert spy.lengths and max(spy.lengths) == max(lengths)  # never the row as a whole
    by_row = per_sequence_logits(logits_of(model, rows), lengths, 110)
    padded_logits = logits_of(model, padded)
    atol = 1e-5 if tuning == "qlora" else 2e-6
    for i, reference in enumerate(alone):
        # float tolerance relative to the logits' scale (~15 for Baichuan): other matmul shapes, other rounding
        tolerance = atol * max(1.0, reference.abs().max().item())
        for got in (packed[i], by_row[i], padded_logits[i, : lengths[i]]):
            assert (got - reference).abs().max().item() <= tolerance, (name, i)

    assert_same_loss_and_grads(model, examples, flat, atol=atol)
    assert_same_loss_and_grads(model, examples, padded, atol=atol)


def test_gradient_checkpointing_and_eval_batches(tiny_llama_dir, monkeypatch):
    """Recomputed layers split the same way; a padded batch with its mask and generation with a cache run
    transformers' SDPA unchanged (no segments)."""
    model = load(tiny_llama_dir, "full")
    use_segment_attention(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    examples = make_examples(model.config.vocab_size, shapes=SHAPES)
    assert_same_loss_and_grads(model, examples, PackingCollator(pad_token_id=0)(examples))

    model.eval()
    prompt = torch.tensor([examples[1]["input_ids"][:20]])
    with torch.no_grad():
        ours = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        model.set_attn_implementation("sdpa")
        stock = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, stock)


def test_packed_lengths_reads_the_restarts():
    assert packed_lengths(torch.tensor([[0, 1, 2, 3]])) is None
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    assert packed_lengths(positions) == [[3, 2, 1], [2, 4]]
    assert packed_lengths(torch.tensor([[0, 0, 0]])) == [[1, 1, 1]]


def test_a_forward_reads_the_restarts_once_for_all_layers(tiny_llama_dir, monkeypatch):
    """Every layer gets the same position_ids: one reading (a GPU sync) per forward; a new batch or the same tensor
    changed in place is read again."""
    from component.model import packed_attention

    model = load(tiny_llama_dir, "full")
    use_segment_attention(model)
    assert model.config.num_hidden_layers > 1
    readings = []
    monkeypatch.setattr(packed_attention, "packed_lengths", lambda p: readings.append(p) or packed_lengths(p))
    batch = PackingCollator(pad_token_id=0)(make_examples(model.config.vocab_size, shapes=SHAPES))
    first = logits_of(model, batch)
    assert len(readings) == 1
    logits_of(model, {**batch, "position_ids": batch["position_ids"].clone()})
    assert len(readings) == 2
    batch["position_ids"][0, 4:] = torch.arange(batch["position_ids"].shape[1] - 4)  # in place: other segments
    changed = logits_of(model, batch)
    assert len(readings) == 3 and not torch.allclose(changed, first)


def test_which_models_can_switch(tiny_llama_dir):
    model = load(tiny_llama_dir, "full")
    assert segment_attention_unsupported(model) is None
    model.config._attn_implementation_internal = "flex_attention"
    assert "flex_attention" in segment_attention_unsupported(model)
    model.config._attn_implementation_internal = "eager"
    use_segment_attention(model)  # eager: the same math, per segment
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    assert "sdpa_segments" not in model.config.to_json_string()  # never written to a saved config.json
