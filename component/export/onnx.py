"""ONNX export: one decoder graph with a KV cache, for onnxruntime (prefill and decode on the same graph).

Graph (the layout of optimum's ORTModelForCausalLM and onnxruntime-genai's decoders):

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past+seq] int64, position_ids [batch, seq] int64,
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]   (past = 0 on the first step)
    outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past+seq, head_dim]

`torch.onnx.export(..., dynamo=True)` traces `DecoderForExport`, which takes the cache as plain tensors and
builds a transformers DynamicCache inside. The wrapper turns the 2D attention mask into the additive 4D mask
(causal + key padding) itself, so the graph has no data-dependent branch ("is everything unmasked?") and the
same code serves Llama-family models and the native Baichuan (which adds its ALiBi slopes to that mask).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from component.config.parser import ConfigError
from component.export.merge import merged_model
from component.model.loader import load_pretrained, load_tokenizer, read_adapter_config, tokenizer_folder

ONNX_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
GRAPH_FILE = "model.onnx"
PROTOBUF_LIMIT = 2 * 1024**3  # one .onnx file holds at most 2 GB; larger weights go to model.onnx.data


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """`past_key_values.{i}.key/value` (inputs) or `present.{i}.key/value` (outputs), layer by layer."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a causal-LM config (Llama family and Baichuan)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def additive_mask(attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, query, past+query]: 0 where a query may attend (causal, real key), the dtype's lowest elsewhere."""
    total = attention_mask.shape[-1]
    query_positions = torch.arange(total - query_length, total, device=attention_mask.device)
    key_positions = torch.arange(total, device=attention_mask.device)
    causal = key_positions[None, :] <= query_positions[:, None]
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    lowest = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype), lowest)


class DecoderForExport(nn.Module):
    """A causal LM with the KV cache as flat tensors: (ids, mask, positions, k0, v0, k1, ...) -> (logits, k0', ...)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=self.model.config)
        dtype = self.model.get_input_embeddings().weight.dtype
        output = self.model(
            input_ids=input_ids,
            attention_mask=additive_mask(attention_mask, input_ids.shape[1], dtype),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        presents = [tensor for layer in output.past_key_values.layers for tensor in (layer.keys, layer.values)]
        return (output.logits, *presents)


def example_inputs(config, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Distinct batch / sequence / past sizes (2, 3, 5), none 0 or 1, so the exporter keeps each one symbolic."""
    batch, seq, past = 2, 3, 5
    layers, kv_heads, head_dim = cache_shape(config)
    input_ids = torch.randint(3, config.vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    attention_mask[0, :2] = 0  # a left-padded row
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, -seq:]
    cache = [torch.randn(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * layers)]
    return (input_ids, attention_mask, position_ids, *cache)


def dynamic_shapes(num_layers: int) -> tuple[Any, ...]:
    names = ("batch", "sequence", "past_sequence", "total_sequence")
    batch, seq, past, total = (torch.export.Dim(name) for name in names)
    cache = [{0: batch, 2: past} for _ in range(2 * num_layers)]
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple(cache))  # *past: one argument


def export_decoder(model: nn.Module, path: Path, opset: int | None = None) -> Path:
    """Trace `model` (a causal LM in eval mode, on the CPU) into `path` (+ `path`.data when over 2 GB)."""
    num_layers = model.config.num_hidden_layers
    dtype = model.get_input_embeddings().weight.dtype
    wrapper = DecoderForExport(model).eval()
    input_names = ["input_ids", "attention_mask", "position_ids", *cache_names(num_layers, "past_key_values")]
    output_names = ["logits", *cache_names(num_layers, "present")]
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            example_inputs(model.config, dtype),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes(num_layers),
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(path), external_data=weights >= PROTOBUF_LIMIT)
    return path


def uses_sliding_window(config) -> bool:
    """Qwen2 says so with use_sliding_window; Mistral-style configs by a sliding_window size. The wrapper's mask
    is plain causal, so such a model is refused rather than exported with a mask it was not trained with."""
    if hasattr(config, "use_sliding_window"):
        return bool(config.use_sliding_window)
    return getattr(config, "sliding_window", None) is not None


def load_source(options):
    """(causal LM in the graph's dtype, on the CPU; tokenizer; folder with train_args.json or None): a base +
    adapter merged in memory (merge.py's code), or a merged / base folder as it is."""
    if options.quantization:
        raise ConfigError("'quantization' is refused: export needs the 16-bit weights (leave out --quantization)")
    if (read_adapter_config(options.adapter) or {}).get("task_type") == "SEQ_CLS":
        raise ConfigError(f"'adapter' {options.adapter!r} is a reward-model adapter; the ONNX export takes causal LMs")
    if options.adapter:
        model, tokenizer = merged_model(
            options.adapter, options.model_name_or_path, options.onnx_dtype, None, options.trust_remote_code
        )
        return model, tokenizer, options.adapter
    config_file = Path(options.model_name_or_path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"'model_name_or_path' {options.model_name_or_path!r} has no config.json (a model folder)")
    if "quantization_config" in json.loads(config_file.read_text(encoding="utf-8")):
        raise ConfigError(
            f"'model_name_or_path' {options.model_name_or_path!r} is saved quantized; export its 16-bit original"
        )
    tokenizer = load_tokenizer(
        tokenizer_folder(options.model_name_or_path), options.trust_remote_code
    )  # before weights
    model = load_pretrained(
        options.model_name_or_path,
        "causal_lm",
        dtype=ONNX_TORCH_DTYPES[options.onnx_dtype],
        trust_remote_code=options.trust_remote_code,
    )
    return model, tokenizer, options.model_name_or_path


def export_onnx(options) -> Path:
    """export.py --format onnx: model.onnx, config.json, generation_config.json, tokenizer, train_args.json."""
    model, tokenizer, settings_folder = load_source(options)
    model = model.to("cpu").eval()
    if uses_sliding_window(model.config):
        raise ConfigError("sliding-window attention (config sliding_window) is not supported by the ONNX export")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")  # traced into plain ONNX ops; flash kernels are not exportable
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    export_decoder(model, output / GRAPH_FILE, options.opset)
    model.config.save_pretrained(output)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(output)
    tokenizer.save_pretrained(output)
    train_args = Path(settings_folder or "") / "train_args.json"
    if settings_folder and train_args.is_file():  # keeps the template choice with the graph
        shutil.copy(train_args, output / "train_args.json")
    write_graph_info(output, model.config, options.onnx_dtype)
    return output


def write_graph_info(output: Path, config, dtype: str) -> None:
    """onnx_config.json: what a runtime needs to feed the graph (cache shape, dtype, input/output names)."""
    layers, kv_heads, head_dim = cache_shape(config)
    info = {
        "graph": GRAPH_FILE,
        "dtype": dtype,
        "num_layers": layers,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "inputs": [
            "input_ids",
            "attention_mask",
            "position_ids",
            "past_key_values.{i}.key",
            "past_key_values.{i}.value",
        ],
        "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
    }
    (output / "onnx_config.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
