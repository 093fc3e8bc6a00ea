"""GGUF export: a merged model folder (or base + LoRA adapter, merged first) as one file llama.cpp runs.

Front end: `export.py --format gguf`. Architectures: Llama (and Llama-shaped models such as the demo's), Qwen2,
and the four Baichuan variants. What happens to the weights, in llama.cpp's conventions:
- Llama: q/k rows re-ordered from transformers' rotate-half RoPE layout to llama.cpp's interleaved pairs.
- Qwen2: names only (llama.cpp runs it with rotate-half RoPE, the q/k/v biases kept).
- Baichuan: `W_pack` split into q | k | v, q and k re-ordered as for Llama (also under ALiBi, where it changes
  nothing: both sides of every dot product move alike); Baichuan2's NormHead folded in (lm_head rows
  L2-normalised), which llama.cpp does not do itself. llama.cpp runs a Baichuan with RoPE when it has 32
  layers and with ALiBi (max bias 8) when it has 40, so other layer counts are refused.
Metadata: the architecture's hyper-parameters, the tokenizer (component/export/gguf_vocab.py) and the chat
template of the model's template (`data.template`) as Jinja. Types: f32, f16, bf16, q8_0 for 2-D weights
(q8_0 needs rows that are a multiple of 32 long, else that tensor is f16); norms and biases stay f32.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from component.config.parser import ConfigError
from component.data.template import get_template
from component.export.gguf_vocab import read_vocab
from component.export.merge import merge_adapter
from component.model.loader import load_tokenizer, trained_template

logger = logging.getLogger(__name__)

# gguf_type -> (tensor type of 2-D weights, general.file_type)
GGUF_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# transformers model_type -> GGUF architecture
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "baichuan": "baichuan"}
# llama.cpp's Baichuan: 32 layers -> RoPE (7B), 40 layers -> ALiBi (13B); see docs/export.md.
BAICHUAN_ROPE_LAYERS, BAICHUAN_ALIBI_LAYERS = 32, 40

# transformers parameter name (per layer: after "model.layers.N.") -> GGUF tensor name (after "blk.N.")
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
SKIPPED = ("rotary_emb.inv_freq",)  # Baichuan-7B checkpoints carry it; llama.cpp computes it
TEMPLATE_KEY = "llm_training.template"  # our template's name (human_assistant, baichuan_chat, chat_template)


def export_gguf(options) -> Path:
    """export.py --format gguf: merge `options.adapter` (fp32, in a temporary folder) if given, then write."""
    output_dir = Path(options.output_dir)
    if options.quantization:
        raise ConfigError(f"'quantization' {options.quantization!r}: GGUF export reads 16/32-bit weights; leave it out")
    if not options.adapter:
        return write_gguf(options.model_name_or_path, output_dir, options.gguf_type)
    with tempfile.TemporaryDirectory(
        prefix="gguf_merge_", dir=output_dir.parent if output_dir.parent.is_dir() else None
    ) as tmp:
        merged = merge_adapter(
            options.adapter, tmp, options.model_name_or_path, "float32", trust_remote_code=options.trust_remote_code
        )
        return write_gguf(merged, output_dir, options.gguf_type, name=Path(options.adapter).name)


def write_gguf(model_dir: str | Path, output_dir: str | Path, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write `output_dir/model-<gguf_type>.gguf` from a merged model folder; returns the file."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"'gguf_type' must be one of {', '.join(GGUF_TYPES)}; got {gguf_type!r}")
    config = read_model_config(model_dir)
    architecture = architecture_of(config, model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    template_name = trained_template(model_dir)

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"model-{gguf_type}.gguf"
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(name or model_dir.name)
    writer.add_file_type(GGUF_TYPES[gguf_type][1])
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, architecture, config)
    read_vocab(model_dir, tokenizer, config["vocab_size"]).add_to(writer)
    writer.add_chat_template(get_template(template_name, tokenizer).jinja_chat_template())
    writer.add_string(TEMPLATE_KEY, template_name)  # cpp/llm_chat renders this template token for token
    for gguf_name, array in converted_tensors(architecture, config, read_tensors(model_dir)):
        data, tensor_type = encode_tensor(array, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("Wrote %s (%s, template %s)", path, gguf_type, template_name)
    return path


# --- config ------------------------------------------------------------------------------------------------------
def read_model_config(model_dir: Path) -> dict:
    """config.json as transformers resolves it (Baichuan's RoPE/ALiBi and NormHead detection included)."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"'model_name_or_path' {str(model_dir)!r} has no config.json (a merged model folder?)")
    return AutoConfig.from_pretrained(model_dir).to_dict()


def architecture_of(config: dict, model_dir: Path) -> str:
    model_type = config.get("model_type")
    if any(name.endswith("ForSequenceClassification") for name in config.get("architectures") or []):
        raise ConfigError(f"{model_dir} is a reward / classification model; GGUF export is for causal LMs")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{model_dir}/config.json: model_type {model_type!r} has no GGUF export here; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    if model_type == "baichuan":
        layers, alibi = config["num_hidden_layers"], config["use_alibi"]
        wanted = BAICHUAN_ALIBI_LAYERS if alibi else BAICHUAN_ROPE_LAYERS
        if layers != wanted:
            raise ConfigError(
                f"{model_dir}: a Baichuan with {'ALiBi' if alibi else 'RoPE'} and {layers} layers cannot run in "
                f"llama.cpp, which uses RoPE only for 32 layers and ALiBi only for 40 (it needs {wanted})"
            )
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{model_dir}/config.json: rope_type {rope['rope_type']!r} is not supported (default only)")
    return ARCHITECTURES[model_type]


def context_length(config: dict) -> int:
    return config.get("max_position_embeddings") or config["model_max_length"]


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def add_hyperparameters(writer: gguf.GGUFWriter, architecture: str, config: dict) -> None:
    heads = config["num_attention_heads"]
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if head_dim(config) * heads != config["hidden_size"]:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))  # llama.cpp wants it also for ALiBi Baichuan (n_rot)
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta")
    if architecture != "baichuan" or not config["use_alibi"]:
        writer.add_rope_freq_base(float(rope_theta or 10000.0))


# --- tensors -----------------------------------------------------------------------------------------------------
def read_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, fp32 array) for every tensor of the folder's safetensors files, one at a time."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{model_dir}: no model.safetensors (weights are read from safetensors only)")
    for file in files:
        with safe_open(model_dir / file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is no dict)
                yield name, handle.get_tensor(name).to(torch.float32).numpy()


def rope_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from rotate-half order (x0..x_{d/2-1}, y0..) to interleaved pairs (x0, y0, x1, y1, ...)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def normalize_rows(weight: np.ndarray) -> np.ndarray:
    """Baichuan2's NormHead: each row L2-normalised, as the hub code's F.normalize(weight)."""
    return torch.nn.functional.normalize(torch.from_numpy(weight), dim=-1).numpy()


def converted_tensors(
    architecture: str, config: dict, tensors: Iterator[tuple[str, np.ndarray]]
) -> Iterator[tuple[str, np.ndarray]]:
    """GGUF name and fp32 array of each tensor, transformed as llama.cpp expects for `architecture`."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    reorder = architecture in ("llama", "baichuan")  # qwen2 runs rotate-half (NEOX) RoPE in llama.cpp
    for name, array in tensors:
        if name.endswith(SKIPPED):
            continue
        if name in GLOBAL_NAMES:
            if name == "lm_head.weight" and architecture == "baichuan" and config["use_norm_head"]:
                array = normalize_rows(array)
            yield GLOBAL_NAMES[name], array
            continue
        prefix, _, rest = name.partition(".layers.")
        block, _, local = rest.partition(".")
        if prefix != "model" or not block.isdigit():
            raise ConfigError(f"tensor {name!r} has no GGUF name for architecture {architecture!r}")
        if local == "self_attn.W_pack.weight":  # Baichuan: q | k | v stacked
            q, k, v = np.split(array, 3, axis=0)
            yield f"blk.{block}.attn_q.weight", rope_pairs(q, heads)
            yield f"blk.{block}.attn_k.weight", rope_pairs(k, kv_heads)
            yield f"blk.{block}.attn_v.weight", v
            continue
        if local not in LAYER_NAMES:
            raise ConfigError(f"tensor {name!r} has no GGUF name for architecture {architecture!r}")
        if reorder and local in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            array = rope_pairs(array, heads if local.startswith("self_attn.q") else kv_heads)
        yield f"blk.{block}.{LAYER_NAMES[local]}", array


def encode_tensor(array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor's bytes in the file's type: 1-D tensors (norms, biases) stay f32, as llama.cpp wants them."""
    tensor_type = GGUF_TYPES[gguf_type][0]
    if array.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32), gguf.GGMLQuantizationType.F32
    if tensor_type == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[tensor_type][0]:
        tensor_type = gguf.GGMLQuantizationType.F16  # rows too short to split in blocks of 32
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), tensor_type
    return gguf.quants.quantize(np.ascontiguousarray(array), tensor_type), tensor_type
