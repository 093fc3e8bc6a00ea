"""Model and tokenizer loading: 4-bit / 8-bit / 16-bit weights, LoRA, gradient checkpointing, DDP placement."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from component.arguments import FinetuneArguments
from component.baichuan import is_baichuan_config, load_baichuan_tokenizer

logger = logging.getLogger(__name__)


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU supports it, fp16 on other GPUs, fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """The model folder's tokenizer; a pad token is borrowed from UNK (or EOS) when it has none."""
    if is_baichuan_config(model_name_or_path):  # the hub's own tokenizer code is broken on transformers 5
        tokenizer = load_baichuan_tokenizer(model_name_or_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def quantization_config(quantization: str | None) -> BitsAndBytesConfig | None:
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def device_map_for_this_process(quantized: bool) -> dict | None:
    """Quantized weights must be placed at load time: each torchrun process on its own GPU."""
    if not quantized or not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def load_model(
    args: FinetuneArguments,
    gradient_checkpointing: bool,
    model_class=AutoModelForCausalLM,
    modules_to_save: list[str] | None = None,
    **model_kwargs,
) -> PreTrainedModel:
    """Load weights as the train args say and attach LoRA when fine-tuning is not full."""
    quantization = quantization_config(args.quantization)
    full = args.finetuning_type == "full"
    model = model_class.from_pretrained(
        args.model_name_or_path,
        quantization_config=quantization,
        dtype=torch.float32 if full else compute_dtype(),
        device_map=device_map_for_this_process(quantization is not None),
        trust_remote_code=args.trust_remote_code,
        **({"attn_implementation": args.attn_implementation} if args.attn_implementation else {}),
        **model_kwargs,
    )
    model.config.use_cache = False  # no KV cache while training; also lets packed batches be detected
    if quantization is not None:
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
    return attach_lora(model, args, modules_to_save)


def attach_lora(model: PreTrainedModel, args: FinetuneArguments, modules_to_save: list[str] | None = None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or "all-linear",  # every linear layer but the output head
        modules_to_save=modules_to_save,
        task_type="SEQ_CLS" if modules_to_save else "CAUSAL_LM",
        bias="none",
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)
    return model
