"""Every fixed choice list of the settings, defined once; the config dataclasses and the code that acts on a
choice both read it from here."""

from __future__ import annotations

TEMPLATES = ("human_assistant", "chat_template", "baichuan_chat")
FINETUNING_TYPES = ("lora", "qlora", "full")
QUANTIZATIONS = ("4bit", "8bit", None)
MOSS_TOOL_MODES = ("skip", "strip")
MERGE_DTYPES = ("bfloat16", "float16", "float32")
EXPORT_FORMATS = ("hf", "gguf", "onnx")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ONNX_DTYPES = ("float32", "float16")
GENERATION_BACKENDS = ("torch", "onnxruntime")  # generate.py: PyTorch model, or an export.py --format onnx folder
LOGITS_PATHS = ("chunked", "model")  # train.lm_head: label positions in chunks, or the model's own forward
# How a packed row attends (train.batching): SDPA per sequence, or a row x row block-diagonal mask; null = the fastest
# exact one the model runs (a varlen kernel, else segments, else the mask).
PACKED_ATTENTIONS = ("segments", "mask", None)

SFT_FORMATS = ("belle", "firefly", "moss", "moss_firefly", "safety_prompts", "alpaca", "sharegpt", "openai")
PREFERENCE_FORMATS = (
    "hh_rlhf",
    "prompt_chosen_rejected",
    "comparison",
    "medical",
    "sharegpt_preference",
    "openai_preference",
)
DATA_FORMATS = ("auto", *SFT_FORMATS, *PREFERENCE_FORMATS)
NONFINITE_MODES = ("stop", "skip")

# Preference-optimization losses (docs/dpo.md); simpo and orpo need no reference model.
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")

# Online RL algorithms (docs/rlhf.md).
RL_ALGORITHMS = ("grpo", "rloo", "ppo")
ROLLOUT_ENGINES = ("transformers", "vllm")
VLLM_DTYPES = ("auto", "bfloat16", "float16", "float32")

# evaluate.py: the benchmarks read from local folders, and how a question is asked and scored (docs/evaluation.md).
BENCHMARKS = ("ceval", "cmmlu", "mmlu")
EVAL_PROTOCOLS = ("lm_eval", "official")
