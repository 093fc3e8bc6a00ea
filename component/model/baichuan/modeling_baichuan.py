"""Native Baichuan / Baichuan2 decoder for transformers 5.x (no remote code).

Reproduces the published model code (Baichuan-7B, Baichuan-13B, Baichuan2-7B, Baichuan2-13B) with the
original parameter names, so checkpoints load unchanged and saved models load back in the hub code and vLLM:

    model.embed_tokens, model.layers.N.self_attn.{W_pack,o_proj}, model.layers.N.mlp.{gate,up,down}_proj,
    model.layers.N.{input,post_attention}_layernorm, model.norm, lm_head

Differences from the hub code that do not change results:
- ALiBi is an additive bias slope_h * (j - i) built for the actual batch (the original adds slope_h * j from a
  persistent max_len x max_len buffer; the two are equal after softmax and the relative form loses less
  precision in bf16).
- NormHead divides the logits by the row norms instead of materialising a normalised copy of lm_head.weight
  and never rewrites the stored weight.
- Attention goes through transformers' attention interface (`sdpa` by default, or `eager`), always with the
  model's own additive bias (ALiBi, padding, left padding, packed batches) as the mask, and transformers 5
  Cache objects. Flash attention is refused: it cannot take an additive 4D bias. Under `sdpa_segments`
  (component/model/packed_attention.py) a packed row attends per sequence instead of through a row x row bias:
  causal SDPA for RoPE, each segment's block of one causal ALiBi bias for ALiBi.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .configuration_baichuan import BaichuanConfig, alibi_slopes

try:  # imported by name: transformers' remote-code loader would look for a `from ..x import` target beside an
    # exported standalone copy of this file, where the project is absent and nothing selects packed attention
    _packed_attention = importlib.import_module("component.model.packed_attention")
except ImportError:
    _packed_attention = None

try:  # transformers >= 5: detects restarting position_ids (padding-free packing)
    from transformers.masking_utils import find_packed_sequence_indices as _hf_find_packed
except ImportError:  # pragma: no cover - only for transformers versions without it
    _hf_find_packed = None

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Positional helpers
# ----------------------------------------------------------------------------------------------------------


def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Segment index per token when `position_ids` restart inside a row (packed batch), else None."""
    if _hf_find_packed is not None:
        return _hf_find_packed(position_ids)
    first = position_ids[:, :1] - 1
    segments = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    return None if bool((segments[:, -1] == 0).all()) else segments


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # In fp32 like Baichuan2's code; cos/sin are [batch, seq, head_dim] and broadcast over heads.
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q_float, k_float = q.float(), k.float()
    q_embed = q_float * cos + rotate_half(q_float) * sin
    k_embed = k_float * cos + rotate_half(k_float) * sin
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


class BaichuanRotaryEmbedding(nn.Module):
    """RoPE cos/sin computed on the fly from position_ids (no max-length caches, nothing to load)."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = position_ids.device
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        inv_freq = 1.0 / (self.base**exponent)
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class BaichuanRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class BaichuanMLP(nn.Module):
    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in plain torch ops, like Llama's; returns ([batch, q_len, heads, head_dim], weights).

    `attention_mask` is the model's additive bias. Without one the attention is plain causal (the model leaves
    the bias out only when q_len == kv_len or q_len == 1), so a causal mask is applied here, as SDPA's
    `is_causal` does on the other path.
    """
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    elif q_len > 1 and getattr(module, "is_causal", True):
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=attn_weights.device)
        causal = causal.tril(diagonal=kv_len - q_len)
        attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _in_dtype(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive bias in the attention's dtype: e.g. fp32 embeddings (peft upcasts them for k-bit training)
    feeding bf16 projections; clamped because fp32's lowest value rounds to -inf in bf16 and fully masked rows
    would turn into NaN."""
    if bias is None or bias.dtype == dtype:
        return bias
    return bias.to(dtype).clamp_min(torch.finfo(dtype).min)


class BaichuanAttention(nn.Module):
    """Multi-head attention with the fused `W_pack` projection (rows q | k | v)."""

    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        segments: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.shape
        proj = self.W_pack(hidden_states).view(bsz, q_len, 3, self.num_heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in proj.unbind(dim=2))

        if position_embeddings is not None:
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_bias = _in_dtype(attention_bias, query.dtype)
        if segments is not None and segments["segment_bias"] is not None:
            segments = {**segments, "segment_bias": _in_dtype(segments["segment_bias"], query.dtype)}

        # The bias (ALiBi, padding, packed segments) is the mask. Without one, SDPA uses is_causal (top-left
        # aligned), right because the model only leaves the bias out when q_len == kv_len or q_len == 1.
        # Attention weights come only from the eager path, so output_attentions uses it whatever is configured.
        attention_interface: Callable = eager_attention_forward
        if not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_bias, dropout=0.0, scaling=self.scaling, **(segments or {})
        )
        attn_output = attn_output.reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(attn_output), attn_weights


class BaichuanDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = BaichuanMLP(config)
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        segments: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_bias=attention_bias,
            position_embeddings=position_embeddings,
            cache=cache,
            output_attentions=output_attentions,
            segments=segments,
        )
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        # A bare tensor keeps activation checkpointing simple; weights only when asked for.
        if output_attentions:
            return hidden_states, attn_weights
        return hidden_states


class BaichuanNormHead(nn.Module):
    """Baichuan2's NormHead: logits = h @ normalize(W, dim=-1)^T; the stored weight stays unnormalised.

    Computed as (h @ W^T) / ||W_row|| so no normalised copy of the vocab x hidden matrix is materialised.
    Deliberately not an nn.Linear subclass: quantisers and LoRA must never swap it for a plain linear layer,
    which would silently drop the normalisation.
    """

    def __init__(self, hidden_size: int, vocab_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.in_features = hidden_size
        self.out_features = vocab_size
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)
        norms = torch.linalg.vector_norm(self.weight, dim=-1, dtype=torch.float32).clamp_min(self.eps)
        return logits * norms.reciprocal().to(logits.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, normalised rows"


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


def _output(cls: type, **values: Any) -> Any:
    """Build a ModelOutput whether this transformers names the cache field `cache` or `past_key_values`."""
    names = {f.name for f in dataclass_fields(cls)}
    if "cache" not in names and "cache" in values:
        values["past_key_values"] = values.pop("cache")
    return cls(**{k: v for k, v in values.items() if k in names})


def _cache_of(output: Any) -> Cache | None:
    names = {f.name for f in dataclass_fields(output)}
    return getattr(output, "cache" if "cache" in names else "past_key_values", None)


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    config: BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    # Baichuan-7B checkpoints carry the persistent RoPE buffer; it is recomputed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, BaichuanNormHead):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)


class BaichuanModel(BaichuanPreTrainedModel):
    """The decoder stack without a head (the `.model` of the causal LM and the classifier)."""

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BaichuanDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = BaichuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = None
        if not config.use_alibi:
            self.rotary_emb = BaichuanRotaryEmbedding(config.head_dim, base=config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _attention_bias(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        batch_size: int,
        q_len: int,
        past_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Additive attention bias [batch or 1, heads or 1, q_len, kv_len], or None for plain causal.

        Combines causality, key padding (2D mask), segment isolation for packed rows (attention_mask None and
        restarting position_ids) and, for ALiBi, slope_h * (key_index - query_index). Absolute indices give
        the right ALiBi distances in every case: masked keys never count, left padding shifts both indices,
        and a packed segment only attends inside itself.
        """
        use_alibi = self.config.use_alibi
        mask_4d = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
        mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if mask_2d is not None and bool(mask_2d.all()):
            mask_2d = None

        segments = None
        if attention_mask is None and past_len == 0 and q_len > 1:
            segments = find_packed_sequence_indices(position_ids.expand(batch_size, -1))

        kv_len = mask_4d.shape[-1] if mask_4d is not None else past_len + q_len
        unmasked = mask_4d is None and mask_2d is None and segments is None
        plain_causal = unmasked and (past_len == 0 or q_len == 1)
        if plain_causal and not use_alibi:
            return None

        min_value = torch.finfo(dtype).min
        q_idx = torch.arange(past_len, past_len + q_len, device=device)
        k_idx = torch.arange(kv_len, device=device)
        if mask_4d is not None:
            allowed = mask_4d.to(device)
        else:
            allowed = (k_idx[None, :] <= q_idx[:, None])[None, None]
            if mask_2d is not None:
                key_mask = mask_2d[:, :kv_len].to(device=device, dtype=torch.bool)
                allowed = allowed & key_mask[:, None, None, :]
            if segments is not None:
                allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])

        if use_alibi:
            slopes = alibi_slopes(self.config.num_attention_heads)
            slopes = torch.tensor(slopes, dtype=torch.float32, device=device)
            distance = (k_idx[None, :] - q_idx[:, None]).to(torch.float32)
            bias = (slopes[:, None, None] * distance[None]).to(dtype)[None]
        else:
            bias = torch.zeros((), dtype=dtype, device=device)

        if allowed.dtype == torch.bool:
            bias = torch.where(allowed, bias, torch.tensor(min_value, dtype=dtype, device=device))
        else:
            # A float 4D mask is already additive (0 / large negative).
            bias = (allowed.to(dtype) + bias).clamp_min(min_value)
        if use_alibi and mask_2d is not None:
            # The hub ALiBi code masks every key for a padding query, so that row attends uniformly to all
            # positions. Only padding positions are affected; kept so losses that count them match exactly.
            query_is_pad = ~mask_2d[:, -q_len:].to(device=device, dtype=torch.bool)
            bias = bias.masked_fill(query_is_pad[:, None, :, None], min_value)
        return bias.contiguous()

    def _segments(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        batch_size: int,
        q_len: int,
        past_len: int,
        dtype: torch.dtype,
    ) -> dict[str, Any] | None:
        """For a packed row under `sdpa_segments`: the attention's per-segment arguments (segment lengths, and for
        ALiBi one causal ALiBi bias as long as the longest segment, whose top-left block serves each); else None."""
        if attention_mask is not None or past_len or q_len == 1:
            return None
        lengths = _packed_attention.packed_lengths(position_ids.expand(batch_size, -1))
        if lengths is None:
            return None
        longest = max(max(row) for row in lengths)
        plain = torch.arange(longest, device=position_ids.device)[None]
        bias = self._attention_bias(None, plain, 1, longest, 0, dtype, position_ids.device)  # None for RoPE
        return {"position_ids": position_ids, "segment_lengths": lengths, "segment_bias": bias}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        if "flash" in (self.config._attn_implementation or ""):  # incl. hub kernels, as transformers checks
            raise ValueError(
                f"Baichuan cannot run attn_implementation={self.config._attn_implementation!r}: its attention mask "
                "is an additive 4D bias (ALiBi slopes, padding, packed segments), which flash-attention kernels "
                "do not take. Use 'sdpa' (the default) or 'eager'."
            )
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError("Pass the KV cache as a transformers Cache object (e.g. DynamicCache).")
        output_attentions = bool(output_attentions)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = cache is not None or (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and use_cache:
            # Recomputed layers would write the cache twice.
            logger.warning_once("use_cache=True does not work with gradient checkpointing; cache disabled.")
            use_cache = False
        if not use_cache:
            cache = None

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0

        if position_ids is None:
            # As the hub code: plain indices. RoPE only sees differences, so left padding without explicit
            # position_ids changes nothing but rounding; generate() passes mask-derived position_ids anyway.
            position_ids = torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0)

        segments = None
        if (
            _packed_attention is not None
            and self.config._attn_implementation == _packed_attention.SEGMENT_ATTENTION
            and not output_attentions
        ):
            segments = self._segments(attention_mask, position_ids, batch_size, q_len, past_len, inputs_embeds.dtype)
        attention_bias = None
        if segments is None:
            attention_bias = self._attention_bias(
                attention_mask, position_ids, batch_size, q_len, past_len, inputs_embeds.dtype, device
            )
        position_embeddings = self.rotary_emb(position_ids) if self.rotary_emb is not None else None

        hidden_states = inputs_embeds
        all_hidden_states: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        all_attentions: tuple[torch.Tensor | None, ...] | None = () if output_attentions else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states += (hidden_states,)
            layer_out = layer(
                hidden_states,
                attention_bias=attention_bias,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=use_cache,
                output_attentions=output_attentions,
                segments=segments,
            )
            if output_attentions:
                hidden_states, weights = layer_out
                all_attentions += (weights,)
            else:
                hidden_states = layer_out

        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states += (hidden_states,)

        output = _output(
            BaseModelOutputWithPast,
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    """Baichuan causal LM; `lm_head` is a NormHead for Baichuan2 (config.use_norm_head)."""

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: BaichuanConfig) -> None:
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.vocab_size = config.vocab_size
        if config.use_norm_head:
            self.lm_head: nn.Module = BaichuanNormHead(config.hidden_size, config.vocab_size)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        # resize_token_embeddings hands back a plain nn.Linear; keep the normalisation for Baichuan2.
        if self.config.use_norm_head and not isinstance(new_embeddings, BaichuanNormHead):
            with torch.device("meta"):  # the weight is replaced right away; do not allocate a second one
                head = BaichuanNormHead(new_embeddings.in_features, new_embeddings.out_features)
            head.weight = new_embeddings.weight
            new_embeddings = head
        self.lm_head = new_embeddings

    def _get_resized_lm_head(
        self,
        old_lm_head: nn.Module,
        new_num_tokens: int | None = None,
        transposed: bool = False,
        mean_resizing: bool = True,
    ) -> nn.Module:
        # transformers only resizes nn.Linear heads: present the NormHead weight as one, and
        # set_output_embeddings() wraps the result back into a NormHead.
        if isinstance(old_lm_head, BaichuanNormHead):
            linear = nn.Linear(old_lm_head.in_features, old_lm_head.out_features, bias=False, device="meta")
            linear.weight = old_lm_head.weight
            old_lm_head = linear
        return super()._get_resized_lm_head(old_lm_head, new_num_tokens, transposed, mean_resizing)

    def z_loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Baichuan2's z-loss, weight * mean(max_logit^2), over the positions that have a target.

        Normalised like the cross-entropy (per label token, over `num_items_in_batch` when the Trainer gives
        it), so it stays correct under gradient accumulation. The hub code averaged over all positions,
        ignored ones included.
        """
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(logits.device)
        valid = shift_labels != ignore_index
        squared_max = logits.float().max(dim=-1).values.pow(2) * valid
        denominator = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp_min(1)
        if torch.is_tensor(denominator):
            denominator = denominator.to(logits.device)
        return self.config.z_loss_weight * squared_max.sum() / denominator

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            if self.config.z_loss_weight:
                loss = loss + self.z_loss(logits, labels, kwargs.get("num_items_in_batch"))

        output = _output(
            CausalLMOutputWithPast,
            loss=loss,
            logits=logits,
            cache=_cache_of(outputs),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class BaichuanForSequenceClassification(GenericForSequenceClassification, BaichuanPreTrainedModel):
    """Reward / classification head, transformers' generic one as for Llama: `.model` backbone, `.score` linear.

    Pools the logits of the last non-pad token of each row (rightmost token != pad_token_id, so left and right
    padding both work); callers that know the attention mask can run `.model` and `.score` themselves.
    """


__all__ = [
    "BaichuanForCausalLM",
    "BaichuanForSequenceClassification",
    "BaichuanModel",
    "BaichuanNormHead",
    "BaichuanPreTrainedModel",
    "alibi_slopes",
]
