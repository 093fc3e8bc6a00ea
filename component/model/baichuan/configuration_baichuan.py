"""Configuration of the Baichuan / Baichuan2 decoder family (native, no remote code).

One config class covers the four published architectures. Two switches select the variant:

- ``use_alibi``: ALiBi attention bias (13B models) instead of RoPE (7B models).
- ``use_norm_head``: Baichuan2's NormHead (rows of ``lm_head.weight`` L2-normalised before the matmul).

When they are not given explicitly they are derived from the fields the hub config.json files carry:
RoPE iff the config has ``max_position_embeddings`` (only the 7B configs do; the 13B configs only have
``model_max_length``), NormHead iff the config has ``z_loss_weight`` (only Baichuan2 configs do) or the
vocabulary is Baichuan2's 125696 pieces.
"""

from __future__ import annotations

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

BAICHUAN2_VOCAB_SIZE = 125696

# Optional hub fields that must not be written as `null` when they were absent: the hub loaders and vLLM
# read them with getattr(..., default) and a stored null would override their defaults.
_DROP_IF_NONE = ("max_position_embeddings", "z_loss_weight", "gradient_checkpointing")


def detect_use_alibi(config_dict: dict[str, Any]) -> bool:
    """ALiBi unless the config names a RoPE length (`max_position_embeddings`), as in the hub configs."""
    return config_dict.get("max_position_embeddings") is None


def detect_use_norm_head(config_dict: dict[str, Any]) -> bool:
    """NormHead for Baichuan2: its configs carry `z_loss_weight` and its vocabulary has 125696 pieces."""
    return (
        "z_loss_weight" in config_dict
        and config_dict["z_loss_weight"] is not None
        or (config_dict.get("vocab_size") == BAICHUAN2_VOCAB_SIZE)
    )


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes exactly as the original `_get_interleave` computes them (same float operations).

    Here, beside the config, so that every runtime of this family (transformers, our vLLM plugin) reads one copy.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def _normalise_gradient_checkpointing(value: Any) -> bool | None:
    # Baichuan-13B's config class stores `gradient_checkpointing = value,` (a one-element tuple, saved as a
    # list), which is truthy even for False and would make transformers switch checkpointing on at load time.
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) > 0 else None
    return None if value is None else bool(value)


@strict
class BaichuanConfig(PreTrainedConfig):
    r"""
    Configuration for Baichuan-7B, Baichuan-13B, Baichuan2-7B and Baichuan2-13B (base and chat).

    Defaults describe Baichuan-13B. Loading a hub `config.json` (model_type "baichuan") gives the right
    variant without remote code; `auto_map` and other unknown keys are kept as attributes and written back
    on save.

    Args:
        vocab_size: vocabulary size (64000 for Baichuan, 125696 for Baichuan2).
        hidden_size: model width.
        intermediate_size: SwiGLU inner width.
        num_hidden_layers: decoder layers.
        num_attention_heads: attention heads (no grouped-query attention in this family).
        hidden_act: MLP activation (always "silu" in the published models).
        model_max_length: context length the model was trained for (13B configs).
        max_position_embeddings: RoPE context length; present only in the 7B configs.
        initializer_range: std of the normal init for fresh weights.
        rms_norm_eps: RMSNorm epsilon.
        use_cache: return a KV cache from forward.
        z_loss_weight: Baichuan2's z-loss weight (0 disables it).
        gradient_checkpointing: legacy hub field; lists/tuples are reduced to their single element.
        use_alibi: ALiBi instead of RoPE; derived from the other fields when None.
        use_norm_head: NormHead lm_head; derived from the other fields when None.
        rope_theta: RoPE base (10000 in every published model).
    """

    model_type = "baichuan"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.W_pack": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 64000
    hidden_size: int = 5120
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    hidden_act: str = "silu"
    model_max_length: int = 4096
    max_position_embeddings: int | None = None
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    z_loss_weight: float | int | None = None
    gradient_checkpointing: bool | list | tuple | None = None
    use_alibi: bool | None = None
    use_norm_head: bool | None = None
    rope_theta: float | int = 10000.0

    def __post_init__(self, **kwargs: Any) -> None:
        self.gradient_checkpointing = _normalise_gradient_checkpointing(self.gradient_checkpointing)
        fields = {
            "max_position_embeddings": self.max_position_embeddings,
            "z_loss_weight": self.z_loss_weight,
            "vocab_size": self.vocab_size,
        }
        if self.use_alibi is None:
            self.use_alibi = detect_use_alibi(fields)
        if self.use_norm_head is None:
            self.use_norm_head = detect_use_norm_head(fields)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        # No GQA in this family; the property lets transformers' static caches size themselves.
        return self.num_attention_heads

    def validate_architecture(self) -> None:
        """Part of `@strict` validation: heads must split the width evenly."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if not self.use_alibi and self.head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}.")

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in _DROP_IF_NONE:
            if output.get(key, 0) is None:
                output.pop(key)
        # The hub spells Baichuan-7B's class "BaiChuanForCausalLM"; llama.cpp and vLLM read the other spelling
        # as the 13B (ALiBi) family, so a Baichuan-1 RoPE model is saved under its hub name.
        if output.get("architectures") == ["BaichuanForCausalLM"] and not self.use_alibi and not self.use_norm_head:
            output["architectures"] = ["BaiChuanForCausalLM"]
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        output = super().to_diff_dict()
        for key in _DROP_IF_NONE:
            if output.get(key, 0) is None:
                output.pop(key)
        return output


__all__ = ["BaichuanConfig", "alibi_slopes", "detect_use_alibi", "detect_use_norm_head"]
