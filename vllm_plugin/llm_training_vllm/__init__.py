"""LLM_training's vLLM plugin: Baichuan and Baichuan2 (all four variants) served natively by vLLM.

vLLM calls `register()` in each of its processes (entry point group `vllm.general_plugins`). It registers
- our `BaichuanConfig` and `BaichuanTokenizer` with transformers' AutoConfig / AutoTokenizer for
  model_type "baichuan", so hub folders and our exports load with trust_remote_code off;
- our vLLM model for both hub spellings of the architecture (`BaichuanForCausalLM`, `BaiChuanForCausalLM`),
  which vLLM removed after 0.23 and would otherwise refuse or hand to its Transformers backend.
The model module is named as a string, so vLLM imports it only when a Baichuan model is loaded.
"""

from __future__ import annotations

ARCHITECTURES = ("BaichuanForCausalLM", "BaiChuanForCausalLM")
MODEL_CLASS = "llm_training_vllm.baichuan:BaichuanForCausalLM"


def register() -> None:
    """Entry point for vLLM: safe to call again (vLLM loads plugins once per process, tests may call it too)."""
    from transformers import AutoConfig, AutoTokenizer
    from vllm import ModelRegistry

    from .configuration_baichuan import BaichuanConfig
    from .tokenization_baichuan import BaichuanTokenizer

    AutoConfig.register(BaichuanConfig.model_type, BaichuanConfig, exist_ok=True)
    AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaichuanTokenizer, exist_ok=True)
    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, MODEL_CLASS)
