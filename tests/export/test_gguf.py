"""export.py --format gguf: the file read back with gguf.GGUFReader holds the expected transform of every merged
weight (names, shapes, types, W_pack split, RoPE pair order, folded NormHead) and the expected metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from component.config.parser import ConfigError
from component.data.conversation import Turn
from component.data.template import get_template
from component.export.gguf import TEMPLATE_KEY, write_gguf
from component.model.loader import load_tokenizer
from tests.export.tiny_models import BAICHUAN_TOKENIZER, BAICHUAN_VARIANTS, build_baichuan, build_qwen2
from tests.utils import REPO

LAYER_SUFFIXES = {  # transformers name inside a layer -> GGUF name inside a block (without the q/k/v split)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}


def interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, row 2i is the rotate-half row i and row 2i+1 the row i + head_dim/2 (llama.cpp's RoPE pairs)."""
    head_dim = weight.shape[0] // heads
    rows = []
    for head in range(heads):
        for i in range(head_dim // 2):
            rows += [head * head_dim + i, head * head_dim + head_dim // 2 + i]
    return weight[rows]


def expected_tensors(folder: Path, config: dict) -> dict[str, np.ndarray]:
    """What each GGUF tensor must hold, written out independently of component/export/gguf.py."""
    state = {name: t.float() for name, t in load_file(folder / "model.safetensors").items()}
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    baichuan = config["model_type"] == "baichuan"
    rope_pairs = config["model_type"] in ("llama", "baichuan")
    expected = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if "lm_head.weight" in state:
        head = state["lm_head.weight"]
        if baichuan and "z_loss_weight" in config:  # only Baichuan2 configs carry it
            head = torch.nn.functional.normalize(head, dim=-1)  # Baichuan2's NormHead, folded in
        expected["output.weight"] = head
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        if baichuan:
            q, k, v = state[prefix + "self_attn.W_pack.weight"].chunk(3)
        else:
            q, k, v = (state[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv")
        if rope_pairs:
            q, k = interleaved(q, heads), interleaved(k, kv_heads)
        expected.update({f"blk.{layer}.attn_q.weight": q, f"blk.{layer}.attn_k.weight": k})
        expected[f"blk.{layer}.attn_v.weight"] = v
        for local, name in LAYER_SUFFIXES.items():
            if prefix + local in state:
                expected[f"blk.{layer}.{name}"] = state[prefix + local]
    return {name: tensor.numpy() for name, tensor in expected.items()}


def check_tensors(reader: gguf.GGUFReader, expected: dict[str, np.ndarray], gguf_type: str) -> None:
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(expected)
    Q = gguf.GGMLQuantizationType
    for name, want in expected.items():
        tensor = tensors[name]
        assert tuple(int(n) for n in tensor.shape) == tuple(reversed(want.shape)), name  # GGUF lists ne0 first
        if want.ndim == 1 or gguf_type == "f32":
            assert tensor.tensor_type == Q.F32, name
            np.testing.assert_array_equal(tensor.data.reshape(want.shape), want, err_msg=name)
        elif gguf_type == "f16" or (gguf_type == "q8_0" and want.shape[-1] % 32):
            assert tensor.tensor_type == Q.F16, name
            np.testing.assert_array_equal(tensor.data.reshape(want.shape), want.astype(np.float16), err_msg=name)
        elif gguf_type == "bf16":
            assert tensor.tensor_type == Q.BF16, name
            bf16 = torch.from_numpy(want).to(torch.bfloat16).float().numpy()  # round to nearest even, as torch
            np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, Q.BF16).reshape(want.shape), bf16)
        else:
            assert tensor.tensor_type == Q.Q8_0, name
            values = gguf.quants.dequantize(tensor.data, Q.Q8_0).reshape(-1, 32)
            blocks = want.reshape(-1, 32)  # blocks of 32: an f16 scale amax/127 and int8 values rounded half away
            scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
            steps = np.trunc(
                np.divide(blocks, scale, out=np.zeros_like(blocks), where=scale > 0) + 0.5 * np.sign(blocks)
            )
            np.testing.assert_array_equal(values, scale.astype(np.float16).astype(np.float32) * steps, err_msg=name)


def fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


# --- Llama (the demo's tokenizer) ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_folder(tiny_llama_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama_sft")
    for file in tiny_llama_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "train_args.json").write_text(json.dumps({"template": "human_assistant"}), encoding="utf-8")
    return folder


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_llama_tensors_in_every_type(llama_folder, tmp_path, gguf_type):
    config = json.loads((llama_folder / "config.json").read_text())
    path = write_gguf(llama_folder, tmp_path, gguf_type)
    assert path == tmp_path / f"model-{gguf_type}.gguf"
    reader = gguf.GGUFReader(path)
    check_tensors(reader, expected_tensors(llama_folder, config), gguf_type)
    file_types = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
    assert fields(reader)["general.file_type"] == file_types[gguf_type]


def test_llama_metadata_and_demo_tokenizer(llama_folder, tmp_path):
    meta = fields(gguf.GGUFReader(write_gguf(llama_folder, tmp_path, "f32")))
    config = json.loads((llama_folder / "config.json").read_text())
    tokenizer = load_tokenizer(str(llama_folder))
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == 256
    assert meta["llama.block_count"] == config["num_hidden_layers"]
    assert meta["llama.embedding_length"] == 64 and meta["llama.feed_forward_length"] == 128
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 4
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.rope.freq_base"] == 10000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    # byte-level BPE: token strings, types, merges as tokenizer.json has them; GPT-2 pre-tokenizer
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    assert meta["tokenizer.ggml.token_type"] == [3 if i in special else 1 for i in range(len(tokenizer))]
    merges = json.loads((llama_folder / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert len(merges) > 0
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id == 1
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == 2
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False  # the template adds BOS itself
    # the chat template renders what data.template encodes, token for token
    assert meta[TEMPLATE_KEY] == "human_assistant"
    template = get_template("human_assistant", tokenizer)
    assert meta["tokenizer.chat_template"] == template.jinja_chat_template()
    messages = [
        {"role": "user", "content": "把 8854 逐位写成汉字"},
        {"role": "assistant", "content": "八八五四"},
        {"role": "user", "content": "把 0170 逐位写成汉字"},
    ]
    text = tokenizer.apply_chat_template(messages, chat_template=meta["tokenizer.chat_template"], tokenize=False)
    assert text == "<s>Human: 把 8854 逐位写成汉字\n\nAssistant: 八八五四</s>Human: 把 0170 逐位写成汉字\n\nAssistant: "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == template.encode_prompt([Turn("把 8854 逐位写成汉字", "八八五四")], "把 0170 逐位写成汉字")


# --- Qwen2 (BPE with merges, GQA, biases, tied embeddings) --------------------------------------------------------
def test_qwen2_tensors_and_metadata(tmp_path):
    folder = build_qwen2(tmp_path / "qwen2")
    config = json.loads((folder / "config.json").read_text())
    path = write_gguf(folder, tmp_path / "out", "q8_0")
    expected = expected_tensors(folder, config)
    assert "output.weight" not in expected  # tied: llama.cpp reuses token_embd
    assert "blk.0.attn_q.bias" in expected and "blk.1.attn_v.bias" in expected
    reader = gguf.GGUFReader(path)
    check_tensors(reader, expected, "q8_0")
    meta = fields(reader)
    tokenizer = load_tokenizer(str(folder))
    assert meta["general.architecture"] == "qwen2"
    assert meta["qwen2.attention.head_count"] == 4 and meta["qwen2.attention.head_count_kv"] == 2
    assert meta["qwen2.context_length"] == 512 and meta["qwen2.rope.freq_base"] == 10000.0
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"] == len(tokenizer) + 12  # padded to the embedding rows
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert tokens[-1] == f"[PAD{config['vocab_size'] - 1}]" and meta["tokenizer.ggml.token_type"][-1] == 5
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert "tokenizer.ggml.bos_token_id" not in meta
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template and meta[TEMPLATE_KEY] == "chat_template"


# --- Baichuan: the four variants ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baichuan_tokenizer_pieces():
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((BAICHUAN_TOKENIZER / "tokenizer.model").read_bytes())
    return proto.pieces


@pytest.mark.parametrize("variant", list(BAICHUAN_VARIANTS))
def test_baichuan_tensors_and_metadata(variant, baichuan_tokenizer_pieces, tmp_path):
    folder = build_baichuan(tmp_path / variant, variant)
    config = json.loads((folder / "config.json").read_text())
    _, alibi, norm_head = BAICHUAN_VARIANTS[variant]
    path = write_gguf(folder, tmp_path / "out", "f32")
    expected = expected_tensors(folder, config)
    reader = gguf.GGUFReader(path)
    check_tensors(reader, expected, "f32")
    head = load_file(folder / "model.safetensors")["lm_head.weight"]
    folded = np.allclose(np.linalg.norm(expected["output.weight"], axis=1), 1.0, atol=1e-5)
    assert folded == norm_head and not np.allclose(head.norm(dim=1).numpy(), 1.0)  # the stored head is raw

    meta = fields(reader)
    assert meta["general.architecture"] == "baichuan"
    assert meta["baichuan.block_count"] == (40 if alibi else 32)  # llama.cpp: 40 -> ALiBi (13B), 32 -> RoPE (7B)
    assert meta["baichuan.context_length"] == 256
    assert meta["baichuan.attention.head_count"] == meta["baichuan.attention.head_count_kv"] == 2
    assert meta["baichuan.rope.dimension_count"] == 16
    assert ("baichuan.rope.freq_base" in meta) == (not alibi)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.ggml.tokens"] == [p.piece for p in baichuan_tokenizer_pieces]
    assert meta["tokenizer.ggml.scores"] == pytest.approx([p.score for p in baichuan_tokenizer_pieces])
    types = meta["tokenizer.ggml.token_type"]
    assert types == [p.type for p in baichuan_tokenizer_pieces]
    assert (types[0], types[1], types[2], types[195], types[196]) == (2, 3, 3, 4, 4)  # unk, control, user-defined
    assert meta["tokenizer.ggml.tokens"][195:197] == ["<reserved_106>", "<reserved_107>"]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta[TEMPLATE_KEY] == "baichuan_chat"
    tokenizer = load_tokenizer(str(folder))
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "是"}]
    messages.append({"role": "user", "content": "再见"})
    text = tokenizer.apply_chat_template(messages, chat_template=meta["tokenizer.chat_template"], tokenize=False)
    assert text == "<reserved_106>你好<reserved_107>是</s><reserved_106>再见<reserved_107>"
    template = get_template("baichuan_chat", tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == template.encode_prompt([Turn("你好", "是")], "再见")


# --- refusals and the front end -----------------------------------------------------------------------------------
def test_baichuan_layer_counts_llama_cpp_would_misread_are_refused(tmp_path, baichuan_tokenizer_pieces):
    folder = build_baichuan(tmp_path / "b", "baichuan2_13b", layers=2)
    with pytest.raises(ConfigError, match="ALiBi and 2 layers cannot run in llama.cpp.*it needs 40"):
        write_gguf(folder, tmp_path / "out", "f16")


def test_unsupported_architecture_and_pickled_weights_are_refused(llama_folder, tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="model_type 'gpt2' has no GGUF export here; supported: llama, qwen2"):
        write_gguf(folder, tmp_path / "out", "f16")
    classifier = tmp_path / "rm"
    classifier.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}
    (classifier / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ConfigError, match="is a reward / classification model"):
        write_gguf(classifier, tmp_path / "out", "f16")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for file in llama_folder.iterdir():
        if file.name != "model.safetensors":
            (pickled / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ConfigError, match="no model.safetensors"):
        write_gguf(pickled, tmp_path / "out", "f16")


def test_export_py_merges_an_adapter_then_writes_gguf(llama_folder, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_folder),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    (adapter / "train_args.json").write_text(
        json.dumps({"template": "human_assistant", "model_name_or_path": str(llama_folder)}), encoding="utf-8"
    )
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")  # what the file must hold: base + adapter, merged in fp32
    command = [sys.executable, "export.py", "--format", "gguf", "--adapter", str(adapter)]
    command += ["--output_dir", str(tmp_path / "gguf"), "--gguf_type", "f32"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "gguf" / "model-f32.gguf"
    assert f"Exported (gguf) to {path}" in result.stdout
    config = json.loads((llama_folder / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for name, want in expected_tensors(tmp_path / "merged", config).items():
        np.testing.assert_allclose(tensors[name].data.reshape(want.shape), want, atol=1e-6, err_msg=name)
    assert fields(reader)["general.name"] == "adapter"
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["model-f32.gguf"]  # the merge was temporary
