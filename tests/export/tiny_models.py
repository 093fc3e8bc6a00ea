"""Tiny model folders for the export tests (built on the spot, nothing downloaded).

- `build_qwen2`: a Qwen2-shaped model (GQA, q/k/v biases, tied embeddings) with a byte-level BPE tokenizer that
  pre-tokenizes with Qwen2's regex, and a ChatML chat template.
- `build_baichuan`: the four Baichuan variants as hub folders (hub config spelling, `auto_map`, weight names
  `W_pack` and an unnormalised `lm_head`), with the real Baichuan2 tokenizer (125696 pieces) in
  tests/fixtures. Baichuan-1 configs say `use_norm_head: false` because that vocabulary size alone would mean
  Baichuan2 (a test that runs no tokenizer may shrink `vocab_size`). `layers=None` gives what llama.cpp needs:
  32 layers for RoPE, 40 for ALiBi.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.utils import FIXTURES

BAICHUAN_TOKENIZER = FIXTURES / "tokenizers" / "baichuan2"
# variant -> (hub architectures spelling, ALiBi, NormHead)
BAICHUAN_VARIANTS = {
    "baichuan_7b": ("BaiChuanForCausalLM", False, False),
    "baichuan_13b": ("BaichuanForCausalLM", True, False),
    "baichuan2_7b": ("BaichuanForCausalLM", False, True),
    "baichuan2_13b": ("BaichuanForCausalLM", True, True),
}
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_baichuan(
    folder: Path, variant: str, layers: int | None = None, hidden: int = 32, seed: int = 0, vocab_size: int = 125696
) -> Path:
    from component.model.baichuan import BaichuanConfig, BaichuanForCausalLM

    architecture, alibi, norm_head = BAICHUAN_VARIANTS[variant]
    hub_config = {
        "architectures": [architecture],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "model_type": "baichuan",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 2,
        "num_hidden_layers": layers or (40 if alibi else 32),
        "vocab_size": vocab_size,  # a smaller one only where no tokenizer runs (the variant keys say NormHead or not)
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "initializer_range": 0.1,
        "model_max_length": 256,
    }
    if not alibi:
        hub_config["max_position_embeddings"] = 256
    if norm_head:
        hub_config["z_loss_weight"] = 0
    else:
        hub_config["use_norm_head"] = False
    torch.manual_seed(seed)
    config = BaichuanConfig(**{k: v for k, v in hub_config.items() if k not in ("architectures", "auto_map")})
    model = BaichuanForCausalLM(config)
    with torch.no_grad():  # rows of very different lengths, so folding the NormHead matters
        model.lm_head.weight.mul_(torch.rand(config.vocab_size, 1) * 4 + 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(hub_config, indent=2), encoding="utf-8")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(BAICHUAN_TOKENIZER / name, folder / name)
    (folder / "train_args.json").write_text(json.dumps({"template": "baichuan_chat"}), encoding="utf-8")
    return folder


def build_qwen2_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from component.demo_assets import demo_numbers, digits_answer, digits_question

    train, _ = demo_numbers()
    corpus = [digits_question(n) + digits_answer(n) for n in train[:500]]
    corpus += ["Human: hello world, it's a test!\n\nAssistant: Yes, it's fine.  Don't worry."] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    from component.demo_assets import CHATML_TEMPLATE

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
    )


def build_qwen2(folder: Path, seed: int = 0, **overrides) -> Path:
    """`overrides`: config fields (e.g. fewer heads for runtimes that need a head size of 32 or more)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_qwen2_tokenizer()
    values = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "initializer_range": 0.1,
        **overrides,
    }
    config = Qwen2Config(
        vocab_size=len(tokenizer) + 12,  # padded embedding rows, as Qwen2 checkpoints have
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **values,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # non-zero biases, so a lost bias shows
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "train_args.json").write_text(json.dumps({"template": "chat_template"}), encoding="utf-8")
    return folder
