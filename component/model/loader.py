"""The one model loader: training, generation, reward scoring and merging all load weights through here.

Written once: the compute dtype, the bitsandbytes config, where weights go (quantized weights are placed at
load time, each torchrun process on its own GPU; others are moved after loading), which folder's tokenizer
to use, what an output folder's train_args.json and adapter_config.json say, and how LoRA is attached or an
adapter loaded. The PEFT task type always comes from the caller's `task`, never from a guess.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from component.config.choices import TEMPLATES
from component.config.parser import ConfigError, closest
from component.config.training import FinetuneArguments
from component.model.baichuan import is_baichuan_config, load_baichuan_tokenizer

logger = logging.getLogger(__name__)

# What a model is loaded for -> (transformers Auto class, PEFT task type).
TASKS: dict[str, tuple[type, str]] = {
    "causal_lm": (AutoModelForCausalLM, "CAUSAL_LM"),
    "seq_cls": (AutoModelForSequenceClassification, "SEQ_CLS"),
}


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on other GPUs, fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantization_config(quantization: str | None, quant_storage: str | None = None) -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
            **({"bnb_4bit_quant_storage": getattr(torch, quant_storage)} if quant_storage else {}),
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def device_map_for_this_process(quantized: bool) -> dict | None:
    """Quantized weights must be placed at load time: each torchrun process on its own GPU (LOCAL_RANK)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not quantized or not torch.cuda.is_available() or is_deepspeed_zero3_enabled():  # zero.Init places them
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


# --- folders -----------------------------------------------------------------------------------------------------
def has_tokenizer(folder: str | Path | None) -> bool:
    return bool(folder) and (Path(folder) / "tokenizer_config.json").is_file()


def tokenizer_folder(*candidates: str | Path | None) -> str:
    """The first folder that holds a tokenizer: an output folder's own (what training used), else the base's."""
    for folder in candidates:
        if has_tokenizer(folder):
            return str(folder)
    return str(next(c for c in candidates if c))


def read_train_args(folder: str | Path | None) -> dict[str, Any]:
    """The resolved settings a recipe saved in its output folder (train_args.json), or {}."""
    file = Path(folder or "") / "train_args.json"
    return json.loads(file.read_text(encoding="utf-8")) if folder and file.is_file() else {}


def trained_template(folder: str | Path | None) -> str:
    """The prompt template the weights in `folder` learned (its train_args.json), else human_assistant."""
    name = read_train_args(folder).get("template")
    return name if name in TEMPLATES else "human_assistant"


def read_adapter_config(folder: str | Path | None) -> dict[str, Any] | None:
    """A PEFT adapter folder's adapter_config.json, or None when the folder holds no adapter."""
    file = Path(folder or "") / "adapter_config.json"
    return json.loads(file.read_text(encoding="utf-8")) if folder and file.is_file() else None


def folder_kind(folder: str | Path) -> str:
    """What an output or model folder holds: reward_adapter, sft_adapter, reward_model, causal_lm or none."""
    adapter = read_adapter_config(folder)
    if adapter is not None:
        return "reward_adapter" if adapter.get("task_type") == "SEQ_CLS" else "sft_adapter"
    config = Path(folder) / "config.json"
    if not config.is_file():
        return "none"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except ValueError:
        return "none"
    return "reward_model" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal_lm"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_local_model(path: str | None, what: str) -> None:
    """A model that is not on disk is an error at once, unless it is clearly a hub id (org/name)."""
    if not path:
        raise ConfigError(f"{what} is not known")
    if Path(path).is_dir():
        return
    if Path(path).is_absolute() or path.startswith((".", "~")) or not _HUB_ID.match(path):
        raise ConfigError(f"{what} {path!r} is not a folder on this machine")


def adapter_base(folder: str | Path) -> str | None:
    """The base model an adapter was trained on: its train_args.json, else adapter_config.json."""
    config = read_adapter_config(folder) or {}
    return read_train_args(folder).get("model_name_or_path") or config.get("base_model_name_or_path")


# A local folder holds a tokenizer when it has one of these (Baichuan: its SentencePiece model, always).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_tokenizer_files(folder: str | Path) -> None:
    """One line naming what is missing, instead of a tokenizer library's error from deep inside the loader."""
    path = Path(folder)
    if not path.is_dir():
        return  # a hub id: transformers says what it cannot find
    needed = ("tokenizer.model",) if is_baichuan_config(path) else TOKENIZER_FILES
    if not any((path / name).is_file() for name in needed):
        raise ConfigError(
            f"model folder {str(path)!r} has no tokenizer: {' / '.join(needed)} missing (an adapter folder carries "
            "the tokenizer training used; or copy the base model's tokenizer files into it)"
        )


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """The folder's tokenizer; a pad token is borrowed from UNK (or EOS) when it has none."""
    check_tokenizer_files(model_name_or_path)
    if is_baichuan_config(model_name_or_path):  # the hub's own tokenizer code is broken on transformers 5
        tokenizer = load_baichuan_tokenizer(model_name_or_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# --- weights -----------------------------------------------------------------------------------------------------
def load_pretrained(
    path: str,
    task: str = "causal_lm",
    *,
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quant_storage: str | None = None,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """Weights of `path` for `task`, quantized and placed as this process needs; not moved otherwise."""
    model_class, _ = TASKS[task]
    quantized = quantization_config(quantization, quant_storage)
    return model_class.from_pretrained(
        path,
        quantization_config=quantized,
        dtype=dtype or compute_dtype(),
        device_map=device_map_for_this_process(quantized is not None),
        trust_remote_code=trust_remote_code,
        **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        **config_kwargs,
    )


def load_model(
    args: FinetuneArguments,
    gradient_checkpointing: bool,
    task: str = "causal_lm",
    modules_to_save: list[str] | None = None,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """Load weights for training as the train args say and attach LoRA when fine-tuning is not full."""
    full = args.finetuning_type == "full"
    model = load_pretrained(
        args.model_name_or_path,
        task,
        quantization=args.quantization,
        dtype=torch.float32 if full else compute_dtype(),
        trust_remote_code=args.trust_remote_code,
        attn_implementation=args.attn_implementation,
        quant_storage=args.bnb_4bit_quant_storage,
        **config_kwargs,
    )
    model.config.use_cache = False  # no KV cache while training; also lets packed batches be detected
    if args.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if full:
        return model
    if gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    if args.adapter_name_or_path:
        return load_adapter(model, args.adapter_name_or_path, task, trainable=True)
    return attach_lora(model, args, task, modules_to_save)


def attach_lora(model: PreTrainedModel, args: FinetuneArguments, task: str, modules_to_save: list[str] | None = None):
    """New LoRA weights on every linear layer but the output head (or `lora_target_modules`)."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, args.lora_target_modules)
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or "all-linear",
        modules_to_save=modules_to_save,
        task_type=TASKS[task][1],
        bias="none",
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)
    return model


def check_target_modules(model: PreTrainedModel, targets: list[str] | None) -> None:
    """Every `lora_target_modules` name must match a module of this model (right after loading, before training)."""
    if not targets:
        return
    names = {name for name, _ in model.named_modules() if name}
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    unknown = [t for t in targets if t not in leaves and t not in names and not any(n.endswith("." + t) for n in names)]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        hint = closest(unknown[0], sorted(leaves))
        raise ConfigError(
            f"'lora_target_modules': {unknown} not found in {type(model).__name__}.{hint} "
            f"Its linear layers: {', '.join(linear)}"
        )


def _mismatch_error(adapter: str, error: Exception) -> ConfigError | None:
    """Peft's dozens of size-mismatch lines -> one line naming the adapter's base and the first mismatch."""
    text = str(error)
    if "size mismatch" not in text:
        return None
    shapes = re.findall(
        r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from "
        r"checkpoint, the shape in current model is (torch.Size\(\[[^\]]*\]\))",
        text,
    )
    base = (read_adapter_config(adapter) or {}).get("base_model_name_or_path")
    first = f"; e.g. {shapes[0][0]}: adapter {shapes[0][1]} vs model {shapes[0][2]}" if shapes else ""
    return ConfigError(
        f"adapter {adapter!r} was trained on base {base!r} and does not fit this model: "
        f"{len(shapes) or 'some'} weights differ in shape{first}"
    )


def load_adapter(
    model: PreTrainedModel, adapter: str, task: str = "causal_lm", trainable: bool = False, name: str = "default"
):
    """A trained adapter on `model` (a second one on a PeftModel is added under `name`); an adapter of another
    task (an RM adapter given for chat) is refused."""
    from peft import PeftModel

    saved = (read_adapter_config(adapter) or {}).get("task_type")
    expected = TASKS[task][1]
    if saved and saved != expected:
        kind = "reward-model" if saved == "SEQ_CLS" else "causal-LM"
        hint = "pass it as --reward_model" if saved == "SEQ_CLS" else "pass it as --adapter"
        raise ConfigError(f"'adapter' {adapter!r} is a {kind} adapter (task_type {saved}); {hint}")
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(adapter, adapter_name=name, is_trainable=trainable)
            return model
        model = PeftModel.from_pretrained(model, adapter, adapter_name=name, is_trainable=trainable)
    except RuntimeError as error:
        mismatch = _mismatch_error(adapter, error)
        if mismatch is None:
            raise
        raise mismatch from None
    if trainable:
        trained, total = model.get_nb_trainable_parameters()
        logger.info("Continuing adapter %s: %d trainable of %d parameters", adapter, trained, total)
    return model


def load_for_inference(
    path: str,
    task: str = "causal_lm",
    *,
    adapter: str | None = None,
    adapters: dict[str, str] | None = None,
    quantization: str | None = None,
    trust_remote_code: bool = False,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """Weights (plus an adapter, or several by name) in eval mode on this process's device, in the compute dtype."""
    model = load_pretrained(path, task, quantization=quantization, trust_remote_code=trust_remote_code, **config_kwargs)
    if quantization is None:
        model.to(inference_device())
    for name, path in ({"default": adapter} if adapter else adapters or {}).items():
        model = load_adapter(model, path, task, name=name)
    model.eval()
    return model
