"""Native Baichuan model: hub-code reference outputs, padding/packing/cache equivalence, save/load, QLoRA.

Reference folders (tests/fixtures/baichuan_ref/) hold tiny random checkpoints and outputs of the ORIGINAL hub
modeling code (transformers 4.33, fp32): Baichuan-13B (ALiBi) and Baichuan2-7B (RoPE + NormHead).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.utils import FIXTURES

REF = FIXTURES / "baichuan_ref"
REF_FOLDERS = ["baichuan_13b_h4", "baichuan2_7b_h4"]
ATOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def baichuan():
    import component.model.baichuan as baichuan

    baichuan.register_baichuan()
    return baichuan


@pytest.fixture(scope="module")
def ref_models(baichuan):
    """Each reference folder loaded once through the Auto classes, remote code off."""
    from transformers import AutoModelForCausalLM

    ref = REF
    models = {}
    for name in REF_FOLDERS:
        model = AutoModelForCausalLM.from_pretrained(ref / name, trust_remote_code=False)
        models[name] = model.eval()
    return models


def _reference(name: str) -> dict:
    with open(REF / name / "reference.json", encoding="utf-8") as handle:
        return json.load(handle)


def _reference_logits(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(REF / name / "reference_logits.safetensors"))


def _tiny_config(baichuan, *, alibi: bool, heads: int = 5, head_dim: int = 8, norm_head: bool = False, **kw):
    """A tiny config shaped like a 13B (ALiBi: no max_position_embeddings) or a 7B (RoPE) hub config."""
    values = {
        "vocab_size": 96,
        "hidden_size": heads * head_dim,
        "intermediate_size": 3 * heads * head_dim,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "model_max_length": 64,
        "initializer_range": 0.1,
    }
    if not alibi:
        values["max_position_embeddings"] = 64
    if norm_head:
        values["z_loss_weight"] = 0
    values.update(kw)
    config = baichuan.BaichuanConfig(**values)
    assert config.use_alibi is alibi
    return config


# ----------------------------------------------------------------------------------------------------------
# Variant detection and config quirks
# ----------------------------------------------------------------------------------------------------------

# The architecture-relevant fields of the published config.json files.
HUB_CONFIGS = {
    "Baichuan-7B": (
        {
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "vocab_size": 64000,
            "max_position_embeddings": 4096,
        },
        False,
        False,
    ),
    "Baichuan-13B": (
        {"hidden_size": 5120, "num_attention_heads": 40, "vocab_size": 64000, "model_max_length": 4096},
        True,
        False,
    ),
    "Baichuan2-7B": (
        {
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "vocab_size": 125696,
            "max_position_embeddings": 4096,
            "model_max_length": 4096,
            "z_loss_weight": 0,
        },
        False,
        True,
    ),
    "Baichuan2-13B": (
        {
            "hidden_size": 5120,
            "num_attention_heads": 40,
            "vocab_size": 125696,
            "model_max_length": 4096,
            "z_loss_weight": 0,
        },
        True,
        True,
    ),
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_variant_detection_matches_published_configs(baichuan, name):
    fields, alibi, norm_head = HUB_CONFIGS[name]
    config = baichuan.BaichuanConfig(**fields, model_type="baichuan")
    assert config.use_alibi is alibi
    assert config.use_norm_head is norm_head
    # vLLM's rule for the real checkpoints: RoPE iff hidden_size == 4096.
    assert config.use_alibi is (fields["hidden_size"] != 4096)
    assert config.head_dim == 128


def test_fixture_configs_detected_and_quirks_accepted(baichuan):
    from transformers import AutoConfig

    ref = REF
    c13 = AutoConfig.from_pretrained(ref / "baichuan_13b_h4", trust_remote_code=False)
    c2 = AutoConfig.from_pretrained(ref / "baichuan2_7b_h4", trust_remote_code=False)
    assert isinstance(c13, baichuan.BaichuanConfig) and isinstance(c2, baichuan.BaichuanConfig)
    assert (c13.use_alibi, c13.use_norm_head) == (True, False)
    assert (c2.use_alibi, c2.use_norm_head) == (False, True)
    assert c13.auto_map["AutoModelForCausalLM"] == "modeling_baichuan.BaichuanForCausalLM"

    quirks = [(False, False), ([False], False), ((False,), False), (None, None), ([True], True)]
    for stored, expected in quirks:
        assert baichuan.BaichuanConfig(gradient_checkpointing=stored).gradient_checkpointing is expected
    # An explicit setting wins over detection.
    assert baichuan.BaichuanConfig(use_alibi=False, max_position_embeddings=None).use_alibi is False
    with pytest.raises(Exception, match="multiple of num_attention_heads"):
        baichuan.BaichuanConfig(hidden_size=100, num_attention_heads=6)

    assert baichuan.is_baichuan_config(ref / "baichuan_13b_h4")
    assert baichuan.is_baichuan_config(ref / "baichuan2_7b_h4" / "config.json")
    assert baichuan.is_baichuan_config(c2) and baichuan.is_baichuan_config({"model_type": "baichuan"})
    assert not baichuan.is_baichuan_config({"model_type": "llama"})
    assert not baichuan.is_baichuan_config(ref / "does-not-exist")
    assert baichuan.chat_generation_defaults(c13)["repetition_penalty"] == 1.1
    assert baichuan.chat_generation_defaults(ref / "baichuan2_7b_h4")["repetition_penalty"] == 1.05


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_hub_folder_python_files_are_never_executed(baichuan, tmp_path, trust_remote_code):
    """A hub-style folder whose .py files raise on import loads with the native classes."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer_dir = FIXTURES / "tokenizers" / "baichuan2"
    folder = tmp_path / "hub"
    shutil.copytree(REF / "baichuan_13b_h4", folder)
    shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    shutil.copy(tokenizer_dir / "tokenizer_config.json", folder / "tokenizer_config.json")
    for module in ("configuration_baichuan", "modeling_baichuan", "tokenization_baichuan", "generation_utils"):
        (folder / f"{module}.py").write_text('raise RuntimeError("hub code executed")\n')

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    assert type(config) is baichuan.BaichuanConfig
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code)
    assert type(model) is baichuan.BaichuanForCausalLM
    classifier = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, trust_remote_code=trust_remote_code
    )
    assert type(classifier) is baichuan.BaichuanForSequenceClassification
    # With trust_remote_code=True transformers prefers a folder's own tokenizer code over a registered class,
    # so the suite loads Baichuan tokenizers with remote code off, or through load_baichuan_tokenizer.
    tokenizers = [baichuan.load_baichuan_tokenizer(folder, trust_remote_code=trust_remote_code)]
    if not trust_remote_code:
        tokenizers.append(AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
    for tokenizer in tokenizers:
        assert type(tokenizer) is baichuan.BaichuanTokenizer
        assert tokenizer.encode("<reserved_106>你好<reserved_107>") == [195, 16829, 196]


# ----------------------------------------------------------------------------------------------------------
# ALiBi slopes
# ----------------------------------------------------------------------------------------------------------


def _slopes_by_formula(n: int) -> list[float]:
    """The closed form from the issue: power of two n -> start^(i+1); else c slopes + every other of 2c."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]
    c = 2 ** math.floor(math.log2(n))
    return _slopes_by_formula(c) + _slopes_by_formula(2 * c)[0::2][: n - c]


def test_alibi_slopes_equal_remote_code_values(baichuan):
    reference = _reference("baichuan_13b_h4")["alibi_slopes_from_remote_code__get_interleave"]
    assert set(reference) >= {"4", "6", "8", "40"}
    for heads, slopes in reference.items():
        assert baichuan.alibi_slopes(int(heads)) == pytest.approx(slopes, rel=1e-14, abs=0)


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 7, 12, 20, 32, 40, 48, 64])
def test_alibi_slopes_follow_the_formula(baichuan, heads):
    assert baichuan.alibi_slopes(heads) == pytest.approx(_slopes_by_formula(heads), rel=1e-12)


def test_alibi_slopes_for_40_heads_in_closed_form(baichuan):
    expected = [2 ** (-0.25 * k) for k in range(1, 33)] + [2 ** (-0.125 * k) for k in range(1, 16, 2)]
    assert baichuan.alibi_slopes(40) == pytest.approx(expected, rel=1e-12)


def test_alibi_bias_is_relative_and_built_for_the_batch(baichuan):
    """bias[h, i, j] = slope_h * (j - i) on allowed keys, huge negative elsewhere; no persistent buffers."""
    from component.model.baichuan.modeling_baichuan import BaichuanModel

    config = _tiny_config(baichuan, alibi=True, heads=6)
    model = BaichuanModel(config)
    assert not list(model.buffers())
    positions = torch.arange(5)[None]
    bias = model._attention_bias(None, positions, 1, 5, 0, torch.float32, torch.device("cpu"))
    assert bias.shape == (1, 6, 5, 5)
    slopes = torch.tensor(baichuan.alibi_slopes(6))
    for i in range(5):
        for j in range(5):
            if j <= i:
                torch.testing.assert_close(bias[0, :, i, j], slopes * (j - i))
            else:
                assert (bias[0, :, i, j] == torch.finfo(torch.float32).min).all()


# ----------------------------------------------------------------------------------------------------------
# Reference outputs of the hub code
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REF_FOLDERS)
def test_loaded_with_native_classes(baichuan, ref_models, name):
    from component.model.baichuan.modeling_baichuan import BaichuanNormHead

    model = ref_models[name]
    assert type(model) is baichuan.BaichuanForCausalLM
    assert isinstance(model.lm_head, BaichuanNormHead) is (name == "baichuan2_7b_h4")
    # Every parameter comes from the checkpoint (nothing freshly initialised, nothing left over).
    assert set(model.state_dict()) == set(_reference(name)["weights_in_checkpoint"])
    # The stored NormHead weight is not normalised and forward never rewrites it.
    if name == "baichuan2_7b_h4":
        from safetensors.torch import load_file

        raw = load_file(str(REF / name / "model.safetensors"))["lm_head.weight"]
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(raw.shape[0]))
        with torch.no_grad():
            model(torch.tensor([[1, 5, 6]]))
        torch.testing.assert_close(model.lm_head.weight, raw, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", REF_FOLDERS)
def test_reference_logits_and_losses(ref_models, name, attn):
    model = ref_models[name]
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    reference = _reference(name)
    logits = _reference_logits(name)
    try:
        for case in reference["cases"].values():
            input_ids = torch.tensor(case["input_ids"])
            mask = torch.tensor(case["attention_mask"])
            real = mask.bool()
            for mode in ("eval", "train"):
                expected = case[mode]
                model.train(mode == "train")
                with torch.no_grad():
                    with_mask = model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
                    no_mask = model(input_ids=input_ids)
                    pad_ignored = model(
                        input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(~real, -100)
                    )
                ref_with = logits[expected["logits_tensor"]]
                ref_without = logits[expected["logits_no_attention_mask_tensor"]]
                assert with_mask.logits.shape == tuple(expected["logits_shape"])
                torch.testing.assert_close(with_mask.logits[real], ref_with[real], rtol=0, atol=ATOL)
                torch.testing.assert_close(no_mask.logits[real], ref_without[real], rtol=0, atol=ATOL)
                argmax = with_mask.logits.argmax(-1)
                assert argmax[real].tolist() == torch.tensor(expected["argmax_ids"])[real].tolist()
                assert with_mask.loss.item() == pytest.approx(expected["loss_labels_eq_input_ids"], abs=ATOL)
                assert pad_ignored.loss.item() == pytest.approx(expected["loss_labels_pad_as_-100"], abs=ATOL)
    finally:
        model.set_attn_implementation("sdpa")
        model.eval()


@pytest.mark.parametrize("name", REF_FOLDERS)
def test_reference_greedy_generation_with_and_without_cache(ref_models, name):
    model = ref_models[name]
    for case in _reference(name)["generation"].values():
        input_ids = torch.tensor(case["input_ids"])
        mask = torch.tensor(case["attention_mask"])
        for use_cache in (True, False):
            output = model.generate(
                input_ids=input_ids, attention_mask=mask, use_cache=use_cache, **case["generate_kwargs"]
            )
            expected = case["output_ids"] if use_cache else case["output_ids_use_cache_false"]
            assert output.tolist() == expected, (case["input_ids"], use_cache)


# ----------------------------------------------------------------------------------------------------------
# Padding, packing and KV cache equivalence (ALiBi with an odd head count, RoPE + NormHead)
# ----------------------------------------------------------------------------------------------------------

VARIANTS = {
    "alibi_5_heads": {"alibi": True, "heads": 5},
    "alibi_6_heads": {"alibi": True, "heads": 6},
    "rope_normhead_4_heads": {"alibi": False, "heads": 4, "norm_head": True},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny_model(request, baichuan):
    torch.manual_seed(0)
    config = _tiny_config(baichuan, **VARIANTS[request.param])
    return baichuan.BaichuanForCausalLM(config).eval()


def _logits(model, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_packing_and_cache_match_single_sequences(tiny_model, attn):
    model = tiny_model
    model.set_attn_implementation(attn)
    try:
        torch.manual_seed(1)
        a = torch.randint(3, 96, (1, 7))
        b = torch.randint(3, 96, (1, 12))
        alone_a, alone_b = _logits(model, a)[0], _logits(model, b)[0]

        # Right padding.
        ids = torch.zeros(2, 12, dtype=torch.long)
        mask = torch.zeros(2, 12, dtype=torch.long)
        ids[0, :7], mask[0, :7] = a, 1
        ids[1], mask[1] = b, 1
        out = _logits(model, ids, attention_mask=mask)
        torch.testing.assert_close(out[0, :7], alone_a, rtol=0, atol=ATOL)
        torch.testing.assert_close(out[1], alone_b, rtol=0, atol=ATOL)

        # Left padding, with generate()-style position_ids and without any.
        ids = torch.zeros(2, 12, dtype=torch.long)
        mask = torch.zeros(2, 12, dtype=torch.long)
        ids[0, 5:], mask[0, 5:] = a, 1
        ids[1], mask[1] = b, 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        for kwargs in ({"position_ids": positions}, {}):
            out = _logits(model, ids, attention_mask=mask, **kwargs)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[0, 5:], alone_a, rtol=0, atol=ATOL)
            torch.testing.assert_close(out[1], alone_b, rtol=0, atol=ATOL)

        # Padding-free packing: position_ids restart, no attention mask; two rows, different orders.
        packed = torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)])
        positions = torch.stack(
            [
                torch.cat([torch.arange(7), torch.arange(12)]),
                torch.cat([torch.arange(12), torch.arange(7)]),
            ]
        )
        out = _logits(model, packed, position_ids=positions)
        torch.testing.assert_close(out[0, :7], alone_a, rtol=0, atol=ATOL)
        torch.testing.assert_close(out[0, 7:], alone_b, rtol=0, atol=ATOL)
        torch.testing.assert_close(out[1, :12], alone_b, rtol=0, atol=ATOL)
        torch.testing.assert_close(out[1, 12:], alone_a, rtol=0, atol=ATOL)
        # A single packed row with broadcast position_ids ([1, seq]) as collators produce it.
        out = _logits(model, packed[:1], position_ids=positions[:1])
        torch.testing.assert_close(out[0, 7:], alone_b, rtol=0, atol=ATOL)

        # KV cache: prefill, a multi-token chunk, then single tokens equal the full forward.
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        chunks = []
        for start, stop in ((0, 5), (5, 9), (9, 10), (10, 11)):
            step = model(b[:, start:stop], cache=cache, use_cache=True)
            cache = step.cache
            chunks.append(step.logits)
        assert cache.get_seq_length() == 11
        torch.testing.assert_close(torch.cat(chunks, 1)[0], alone_b[:11], rtol=0, atol=ATOL)
    finally:
        model.set_attn_implementation("sdpa")


def test_left_padded_generation_matches_unpadded(tiny_model):
    torch.manual_seed(2)
    prompt = torch.randint(3, 96, (1, 6))
    other = torch.randint(3, 96, (1, 9))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    alone = tiny_model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)[0, 6:]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = prompt, 1
    ids[1], mask[1] = other, 1
    batched = tiny_model.generate(ids, attention_mask=mask, **kwargs)
    assert batched[0, 9:].tolist() == alone.tolist()


# ----------------------------------------------------------------------------------------------------------
# Loss, heads, checkpointing, save/load
# ----------------------------------------------------------------------------------------------------------


def test_loss_honours_num_items_in_batch_and_z_loss(baichuan):
    torch.manual_seed(3)
    config = _tiny_config(baichuan, alibi=False, heads=4, norm_head=True)
    model = baichuan.BaichuanForCausalLM(config).eval()
    ids = torch.randint(3, 96, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        logits = out.logits
        targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 96), targets.reshape(-1), ignore_index=-100, reduction="none"
        )
        valid = targets.reshape(-1) != -100
        assert out.loss.item() == pytest.approx(token_losses[valid].mean().item(), rel=1e-6)
        # Trainer's num_items_in_batch: sum over label tokens / items of the whole accumulated batch.
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
        assert summed.item() == pytest.approx(token_losses[valid].sum().item() / 40, rel=1e-6)

        model.config.z_loss_weight = 0.01
        with_z = model(ids, labels=labels).loss
        squared_max = logits.max(-1).values.pow(2).reshape(-1)[valid]
        assert with_z.item() == pytest.approx(out.loss.item() + 0.01 * squared_max.mean().item(), rel=1e-6)
        with_z_items = model(ids, labels=labels, num_items_in_batch=40).loss
        expected = (token_losses[valid].sum() + 0.01 * squared_max.sum()) / 40
        assert with_z_items.item() == pytest.approx(expected.item(), rel=1e-6)


def test_norm_head_is_row_normalised_linear(baichuan):
    from component.model.baichuan.modeling_baichuan import BaichuanNormHead

    torch.manual_seed(4)
    head = BaichuanNormHead(8, 5)
    torch.nn.init.normal_(head.weight)
    hidden = torch.randn(2, 3, 8)
    expected = hidden @ torch.nn.functional.normalize(head.weight, dim=-1).T
    torch.testing.assert_close(head(hidden), expected)
    assert not isinstance(head, torch.nn.Linear)  # quantisers must not replace it by a plain Linear


def test_resize_token_embeddings_keeps_norm_head(baichuan):
    from component.model.baichuan.modeling_baichuan import BaichuanNormHead

    model = baichuan.BaichuanForCausalLM(_tiny_config(baichuan, alibi=False, heads=4, norm_head=True))
    old = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(100, mean_resizing=False)
    assert isinstance(model.lm_head, BaichuanNormHead)
    assert model.lm_head.weight.shape == (100, 32) and model.config.vocab_size == 100
    torch.testing.assert_close(model.lm_head.weight[:96].detach(), old)


def test_gradient_checkpointing_gives_same_loss_and_grads(baichuan):
    torch.manual_seed(5)
    model = baichuan.BaichuanForCausalLM(_tiny_config(baichuan, alibi=True, heads=5)).train()
    ids = torch.randint(3, 96, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


def test_sequence_classification_head(baichuan, tmp_path):
    from transformers import AutoModelForSequenceClassification
    from transformers.modeling_layers import GenericForSequenceClassification

    torch.manual_seed(6)
    causal = baichuan.BaichuanForCausalLM(_tiny_config(baichuan, alibi=True, heads=5))
    causal.save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    assert type(model) is baichuan.BaichuanForSequenceClassification
    assert isinstance(model, GenericForSequenceClassification) and model.base_model_prefix == "model"
    assert isinstance(model.model, baichuan.BaichuanModel) and model.base_model is model.model
    assert model.model.config is model.config  # one config: set_attn_implementation, use_cache reach the backbone
    assert isinstance(model.score, torch.nn.Linear) and model.score.bias is None
    assert model.score.weight.shape == (1, 40)
    assert model.get_input_embeddings() is model.model.embed_tokens
    torch.testing.assert_close(model.model.embed_tokens.weight, causal.model.embed_tokens.weight)

    seq = torch.randint(3, 96, (1, 6))
    right = torch.zeros(1, 9, dtype=torch.long)
    right[0, :6] = seq
    left = torch.zeros(1, 9, dtype=torch.long)
    left[0, 3:] = seq
    with torch.no_grad():
        alone = model(seq).logits
        manual = model.score(model.model(seq).last_hidden_state)[:, -1]
        from_right = model(right, attention_mask=(right != 0).long()).logits
        from_left = model(left, attention_mask=(left != 0).long()).logits
    assert alone.shape == (1, 1)
    torch.testing.assert_close(alone, manual)
    torch.testing.assert_close(from_right, alone, rtol=0, atol=ATOL)
    torch.testing.assert_close(from_left, alone, rtol=0, atol=ATOL)


def test_sequence_classification_pools_last_non_pad_token(baichuan, tmp_path):
    """Logits = score(hidden state of the rightmost token != pad_token_id), computed by hand from `.model`."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(6)
    baichuan.BaichuanForCausalLM(_tiny_config(baichuan, alibi=False, heads=4, norm_head=True)).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3).eval()
    assert model.num_labels == 3 and model.score.weight.shape == (3, 32)
    assert model.config.pad_token_id == 0
    ids = torch.randint(3, 96, (3, 9))
    ids[0, 6:] = 0  # right padded: pooled at 5
    ids[1, :2] = 0  # left padded: pooled at 8
    mask = (ids != 0).long()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
        expected = torch.stack([hidden[0, 5], hidden[1, 8], hidden[2, 8]]) @ model.score.weight.T
        as_tuple = model(ids, attention_mask=mask, return_dict=False)
        embeds = model.model.embed_tokens(ids[1:2, 2:])
        from_embeds = model(inputs_embeds=embeds).logits  # no ids to find padding: the last position
        last_of_embeds = model.score(model.model(inputs_embeds=embeds).last_hidden_state[:, -1])
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.logits, rtol=0, atol=0)
    torch.testing.assert_close(from_embeds, last_of_embeds)
    torch.testing.assert_close(from_embeds, out.logits[1:2], rtol=0, atol=ATOL)

    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="padding token"):
        model(ids)


def test_sequence_classification_lora_with_trainable_score(baichuan, tmp_path):
    """peft LoRA + modules_to_save=["score"]: trains, saves and reloads through AutoModelForSequenceClassification."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(8)
    baichuan.BaichuanForCausalLM(_tiny_config(baichuan, alibi=True, heads=5)).save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1)
    targets = ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["score"], task_type="SEQ_CLS")
    model = get_peft_model(model, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.score.modules_to_save.default.weight" in trainable
    assert all("lora_" in n or ".score.modules_to_save." in n for n in trainable)

    ids = torch.randint(3, 96, (2, 10))
    ids[0, 7:] = 0
    mask = (ids != 0).long()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([1.0, -1.0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert math.isfinite(loss.item())
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, trained, rtol=0, atol=0)
        assert not torch.equal(reloaded.get_base_model().score.original_module.weight, reloaded.score.weight)


def test_attention_goes_through_the_attention_interface(baichuan, monkeypatch):
    """Layers look up config._attn_implementation in ALL_ATTENTION_FUNCTIONS and pass the ALiBi bias as the mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    masks = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "baichuan_probe", probe)
    torch.manual_seed(9)
    model = baichuan.BaichuanForCausalLM(_tiny_config(baichuan, alibi=True, heads=5)).eval()
    ids = torch.randint(3, 96, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    sdpa = _logits(model, ids, attention_mask=mask)
    model.set_attn_implementation("baichuan_probe")
    probed = _logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(probed, sdpa, rtol=0, atol=0)
    assert len(masks) == model.config.num_hidden_layers
    bias = model.model._attention_bias(mask, torch.arange(8)[None], 2, 8, 0, torch.float32, torch.device("cpu"))
    for seen in masks:
        torch.testing.assert_close(seen, bias, rtol=0, atol=0)

    # output_attentions always takes the eager path (the only one that returns weights), whatever is configured.
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(masks) == model.config.num_hidden_layers
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 5, 8, 8)
    torch.testing.assert_close(out.logits, sdpa, rtol=0, atol=ATOL)
    for weights in out.attentions:
        torch.testing.assert_close(weights.sum(-1)[1, :, :6], torch.ones(5, 6))
        assert (weights[1, :, :6, 6:] == 0).all()  # real queries never see padding keys, nor later keys:
        assert (weights[0].triu(diagonal=1) == 0).all() and (weights[1, :, :6].triu(diagonal=1) == 0).all()


def test_flash_attention_is_refused_with_a_clear_error(baichuan):
    model = baichuan.BaichuanForCausalLM(_tiny_config(baichuan, alibi=True, heads=5))
    for implementation in ("flash_attention_2", "kernels-community/flash-attn2"):
        with pytest.raises(ValueError, match="does not support Flash Attention"):
            model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="does not support Flash Attention"):
        baichuan.BaichuanForCausalLM.from_pretrained(REF / "baichuan_13b_h4", attn_implementation="flash_attention_2")
    model.config._attn_implementation_internal = "flash_attention_2"  # bypassing the checks above
    with pytest.raises(ValueError, match="additive 4D bias"):
        model(torch.tensor([[3, 4, 5]]))


@pytest.mark.parametrize("name", REF_FOLDERS)
def test_save_and_reload_keeps_weight_names_config_and_logits(ref_models, name, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = ref_models[name]
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        saved_names = set(handle.keys())
    assert saved_names == set(_reference(name)["weights_in_checkpoint"])

    with open(tmp_path / "config.json", encoding="utf-8") as handle:
        saved = json.load(handle)
    with open(REF / name / "config.json", encoding="utf-8") as handle:
        original = json.load(handle)
    assert saved["model_type"] == "baichuan"
    assert saved["architectures"] == original["architectures"]  # the hub spelling (BaiChuanForCausalLM for 7B)
    assert saved["auto_map"] == original["auto_map"]  # the hub loader still finds its code
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "model_max_length"):
        assert saved[key] == original[key]
    # Fields absent from the original stay absent (13B: no max_position_embeddings / z_loss_weight).
    for key in ("max_position_embeddings", "z_loss_weight"):
        assert (key in saved) == (key in original)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor(_reference(name)["cases"]["single_40"]["input_ids"])
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# QLoRA on CPU
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_qlora_4bit_step_on_13b_shaped_checkpoint(baichuan, tmp_path):
    """4-bit NF4 (double quant) + LoRA on W_pack/o_proj/gate/up/down of an ALiBi model: the loss falls."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(7)
    # 13B layout scaled down: ALiBi, 5 heads of 64, intermediate/hidden ~ 2.6 (bnb's CPU kernels want
    # feature sizes divisible by 64).
    config = _tiny_config(baichuan, alibi=True, heads=5, head_dim=64, intermediate_size=832, vocab_size=256)
    baichuan.BaichuanForCausalLM(config).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    import bitsandbytes as bnb

    assert isinstance(model.model.layers[0].self_attn.W_pack, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # output head kept unquantised

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    targets = ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    )
    lora_modules = {n.split(".")[-1] for n, _ in model.named_modules() if n.endswith(tuple(targets))}
    assert lora_modules == set(targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.randint(3, 256, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < losses[0] - 0.5, losses
