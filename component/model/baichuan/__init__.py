"""Native Baichuan / Baichuan2 support (model, config, tokenizer) without `trust_remote_code`.

import component.model.baichuan as baichuan
baichuan.register_baichuan()            # idempotent; component/model/__init__.py calls it on import
model = AutoModelForCausalLM.from_pretrained(path)       # hub folder, trust_remote_code False
tokenizer = AutoTokenizer.from_pretrained(path)          # or baichuan.load_baichuan_tokenizer(path)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .configuration_baichuan import BaichuanConfig, detect_use_alibi, detect_use_norm_head
from .modeling_baichuan import (
    BaichuanForCausalLM,
    BaichuanForSequenceClassification,
    BaichuanModel,
    BaichuanPreTrainedModel,
    alibi_slopes,
)
from .tokenization_baichuan import BaichuanTokenizer

MODEL_TYPE = "baichuan"

# What a saved folder needs to load with plain transformers 5 and trust_remote_code=True, without this project:
# our three standalone files (they import only torch, transformers, huggingface_hub and sentencepiece) and an
# auto_map naming their classes. The hub's own files were written for transformers 4.33 and fail on 5.
STANDALONE_FILES = ("configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py")
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]}
AUTO_MAP = {
    "AutoConfig": "configuration_baichuan.BaichuanConfig",
    "AutoModel": "modeling_baichuan.BaichuanModel",
    "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
    "AutoModelForSequenceClassification": "modeling_baichuan.BaichuanForSequenceClassification",
    **TOKENIZER_AUTO_MAP,
}

# Sampling defaults of the chat models (their hub generation_config.json); from_pretrained already reads that
# file when a chat folder ships it, these are for callers that build a GenerationConfig themselves.
CHAT_GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "baichuan": {"do_sample": True, "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.1},
    "baichuan2": {
        "do_sample": True,
        "temperature": 0.3,
        "top_k": 5,
        "top_p": 0.85,
        "repetition_penalty": 1.05,
    },
}


def register_baichuan() -> None:
    """Register the native classes with the Auto classes for model_type "baichuan". Safe to call repeatedly.

    After this, AutoConfig / AutoModel / AutoModelForCausalLM / AutoModelForSequenceClassification /
    AutoTokenizer load a hub Baichuan folder with trust_remote_code False (its `auto_map` is ignored).
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    AutoConfig.register(MODEL_TYPE, BaichuanConfig, exist_ok=True)
    AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
    AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
    classifier = BaichuanForSequenceClassification
    AutoModelForSequenceClassification.register(BaichuanConfig, classifier, exist_ok=True)
    AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaichuanTokenizer, exist_ok=True)


def write_standalone_code(folder: str | os.PathLike) -> None:
    """Make a saved Baichuan folder self-contained: our standalone files next to the weights, `auto_map` in
    config.json (and tokenizer_config.json) naming them, so transformers 5 with trust_remote_code=True loads it
    where this project is not installed. Our own loader still ignores them (registered classes win)."""
    folder = Path(folder)
    for name in STANDALONE_FILES:
        shutil.copyfile(Path(__file__).parent / name, folder / name)
    for file, auto_map in (("config.json", AUTO_MAP), ("tokenizer_config.json", TOKENIZER_AUTO_MAP)):
        path = folder / file
        if path.is_file():
            values = json.loads(path.read_text(encoding="utf-8"))
            values["auto_map"] = auto_map
            path.write_text(json.dumps(values, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def _read_config_dict(path_or_config: Any) -> dict[str, Any] | None:
    if isinstance(path_or_config, dict):
        return path_or_config
    if hasattr(path_or_config, "to_dict"):
        return path_or_config.to_dict()
    if isinstance(path_or_config, (str, os.PathLike)):
        path = Path(path_or_config)
        config_file = path / "config.json" if path.is_dir() else path
        if config_file.is_file():
            with open(config_file, encoding="utf-8") as handle:
                return json.load(handle)
    return None


def is_baichuan_config(path_or_config: Any) -> bool:
    """True for a Baichuan folder, config.json path, config dict or config object (model_type "baichuan")."""
    config = _read_config_dict(path_or_config)
    return config is not None and config.get("model_type") == MODEL_TYPE


def chat_generation_defaults(path_or_config: Any) -> dict[str, Any]:
    """Sampling defaults of Baichuan-13B-Chat or, for Baichuan2 (NormHead) configs, of Baichuan2-Chat."""
    if isinstance(path_or_config, BaichuanConfig):
        baichuan2 = bool(path_or_config.use_norm_head)
    else:
        config = _read_config_dict(path_or_config)
        if config is None or config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"not a Baichuan config: {path_or_config!r}")
        baichuan2 = bool(config.get("use_norm_head", detect_use_norm_head(config)))
    return dict(CHAT_GENERATION_DEFAULTS["baichuan2" if baichuan2 else "baichuan"])


def load_baichuan_tokenizer(path: str | os.PathLike, **kwargs: Any) -> BaichuanTokenizer:
    """Load the tokenizer of a Baichuan folder (tokenizer.model + tokenizer_config.json) without remote code.

    Equivalent to `AutoTokenizer.from_pretrained(path)` after `register_baichuan()`; keyword arguments
    (e.g. `padding_side="left"`, `model_max_length=1024`) are passed through.
    """
    kwargs.pop("trust_remote_code", None)
    kwargs.pop("use_fast", None)
    return BaichuanTokenizer.from_pretrained(path, **kwargs)


__all__ = [
    "AUTO_MAP",
    "BaichuanConfig",
    "BaichuanForCausalLM",
    "BaichuanForSequenceClassification",
    "BaichuanModel",
    "BaichuanPreTrainedModel",
    "BaichuanTokenizer",
    "CHAT_GENERATION_DEFAULTS",
    "alibi_slopes",
    "chat_generation_defaults",
    "detect_use_alibi",
    "detect_use_norm_head",
    "is_baichuan_config",
    "load_baichuan_tokenizer",
    "register_baichuan",
    "write_standalone_code",
]
