"""Fixtures of the web tests: a tiny base model, two LoRA adapters on it and a LoRA reward model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.utils import TINY_LLAMA


@pytest.fixture(scope="session")
def web_models(tmp_path_factory, demo_tokenizer) -> dict[str, str]:
    """base, sft, dpo (random LoRA adapters) and rm (a random LoRA reward model), as folders.

    The base can only write digits and Han characters, the demo task's answer alphabet (the other rows of its
    LM head are zero, so they never win): answers are plain text that never ends early, and with 4096 positions
    a long answer takes long enough to be stopped.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from component.demo_assets import build_tiny_model

    root = tmp_path_factory.mktemp("web_models")
    base = build_tiny_model(
        root / "base", config={**TINY_LLAMA, "max_position_embeddings": 4096}, tokenizer=demo_tokenizer
    )
    model = AutoModelForCausalLM.from_pretrained(base)
    answer_alphabet = re.compile(r"[0-9\u4e00-\u9fff]")
    keep = torch.tensor(
        [bool(answer_alphabet.fullmatch(demo_tokenizer.decode([i]))) for i in range(len(demo_tokenizer))]
    )
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0
    model.save_pretrained(base)
    folders = {"base": str(base)}
    for name, seed in (("sft", 1), ("dpo", 2)):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(root / name)
        (root / name / "train_args.json").write_text(json.dumps({"template": "human_assistant"}), encoding="utf-8")
        folders[name] = str(root / name)
    torch.manual_seed(3)
    reward = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, pad_token_id=demo_tokenizer.pad_token_id
    )
    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"],
        task_type="SEQ_CLS",
        init_lora_weights=False,
    )
    get_peft_model(reward, config).save_pretrained(root / "rm")
    train_args = {"model_name_or_path": str(base), "template": "human_assistant", "max_seq_length": 128}
    (root / "rm" / "train_args.json").write_text(json.dumps(train_args), encoding="utf-8")
    folders["rm"] = str(root / "rm")
    return folders
