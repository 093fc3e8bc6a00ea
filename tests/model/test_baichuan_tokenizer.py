"""Native Baichuan tokenizer against the ORIGINAL hub BaichuanTokenizer (tokenizer_reference.json).

The reference holds tokens, encode() with and without special tokens, __call__ and decodes of 19 strings for
the Baichuan2 tokenizer.model under the hub configs (add_bos_token false) and under the class defaults.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.utils import FIXTURES

TOKENIZER_DIR = FIXTURES / "tokenizers" / "baichuan2"
REFERENCE = FIXTURES / "baichuan_ref" / "tokenizer_reference.json"

# reference config name -> (tokenizer_config file, special_tokens_map file) in tokenizers/baichuan2/
HUB_CONFIGS = {
    "baichuan2_13b_chat_hub_config": ("tokenizer_config.json", "special_tokens_map.json"),
    "baichuan2_7b_hub_config": (
        "tokenizer_config.baichuan2_7b_chat.json",
        "special_tokens_map.baichuan2_7b_chat.json",
    ),
}
ATTRIBUTES = [
    "vocab_size",
    "add_bos_token",
    "add_eos_token",
    "bos_token",
    "bos_token_id",
    "eos_token",
    "eos_token_id",
    "unk_token",
    "unk_token_id",
    "pad_token",
    "pad_token_id",
    "model_max_length",
    "padding_side",
]


@pytest.fixture(scope="module")
def reference() -> dict:
    with open(REFERENCE, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def baichuan():
    import component.model.baichuan as baichuan

    baichuan.register_baichuan()
    return baichuan


def _hub_folder(root: Path, name: str) -> Path:
    """A folder laid out like the hub repo: tokenizer.model, tokenizer_config.json, special_tokens_map."""
    config_file, special_file = HUB_CONFIGS[name]
    folder = root / name
    folder.mkdir()
    shutil.copy(TOKENIZER_DIR / "tokenizer.model", folder / "tokenizer.model")
    shutil.copy(TOKENIZER_DIR / config_file, folder / "tokenizer_config.json")
    shutil.copy(TOKENIZER_DIR / special_file, folder / "special_tokens_map.json")
    return folder


@pytest.fixture(scope="module")
def hub_tokenizers(reference, baichuan, tmp_path_factory) -> dict:
    """Each hub layout loaded through AutoTokenizer with remote code off (its auto_map is ignored)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("baichuan_tokenizers")
    tokenizers = {}
    for name in HUB_CONFIGS:
        tokenizers[name] = AutoTokenizer.from_pretrained(_hub_folder(root, name), trust_remote_code=False)
    return tokenizers


def _mismatches(tokenizer, rows: list[dict], skip_texts: frozenset[str] = frozenset()) -> list[str]:
    problems = []
    for row in rows:
        text = row["text"]
        if text in skip_texts:
            continue
        got = {
            "tokens": tokenizer.tokenize(text),
            "encode_default": tokenizer.encode(text),
            "encode_add_special_tokens_false": tokenizer.encode(text, add_special_tokens=False),
            "call_input_ids": tokenizer(text)["input_ids"],
            "decode_default": tokenizer.decode(row["encode_default"]),
            "decode_add_special_tokens_false_ids": tokenizer.decode(row["encode_add_special_tokens_false"]),
            "decode_skip_special_tokens": tokenizer.decode(row["encode_default"], skip_special_tokens=True),
        }
        for key, value in got.items():
            if value != row[key]:
                problems.append(f"{key} of {text!r}: {value!r} != {row[key]!r}")
    return problems


def _attribute_mismatches(tokenizer, expected: dict) -> list[str]:
    problems = []
    for key in ATTRIBUTES:
        if getattr(tokenizer, key) != expected[key]:
            problems.append(f"{key}: {getattr(tokenizer, key)!r} != {expected[key]!r}")
    if len(tokenizer) != expected["len"]:
        problems.append(f"len: {len(tokenizer)} != {expected['len']}")
    if tokenizer.convert_ids_to_tokens([195, 196]) != expected["convert_ids_to_tokens_195_196"]:
        problems.append("ids 195/196")
    if tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) != expected["convert_ids_to_tokens_0_1_2_3"]:
        problems.append("ids 0-3")
    reserved = ["<reserved_102>", "<reserved_103>", "<reserved_106>", "<reserved_107>"]
    reserved_ids = expected["convert_tokens_to_ids_reserved_102_103_106_107"]
    if tokenizer.convert_tokens_to_ids(reserved) != reserved_ids:
        problems.append("reserved tokens")
    return problems


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_config_reproduces_original_tokenizer(reference, hub_tokenizers, baichuan, name):
    tokenizer = hub_tokenizers[name]
    assert type(tokenizer) is baichuan.BaichuanTokenizer
    expected = reference["configs"][name]
    assert len(expected["rows"]) == len(reference["texts"]) == 19
    assert _mismatches(tokenizer, expected["rows"]) == []
    assert _attribute_mismatches(tokenizer, expected["tokenizer"]) == []


def test_raw_sentencepiece_ids_agree(reference, hub_tokenizers):
    tokenizer = hub_tokenizers["baichuan2_13b_chat_hub_config"]
    raw = reference["raw_sentencepiece_encode"]
    assert len(raw) == len(reference["texts"])
    for text, ids in zip(reference["texts"], raw, strict=True):
        assert tokenizer.sp_model.encode(text) == ids
        if "<s>" not in text and "</s>" not in text:  # the only texts where added special tokens matter
            assert tokenizer.encode(text, add_special_tokens=False) == ids


def test_class_defaults_without_config(reference, baichuan):
    """Constructed directly: add_bos_token on, no pad token, like the original class."""
    expected = reference["configs"]["class_defaults_no_config"]
    tokenizer = baichuan.BaichuanTokenizer(vocab_file=str(TOKENIZER_DIR / "tokenizer.model"))
    assert _attribute_mismatches(tokenizer, expected["tokenizer"]) == []
    # The original class, built by hand in transformers 4.33, did not match special tokens written in the
    # text (the hub configs do); transformers 5 always does unless split_special_tokens is set.
    literal_specials = frozenset(t for t in reference["texts"] if "<s>" in t or "</s>" in t)
    assert len(literal_specials) == 1
    assert _mismatches(tokenizer, expected["rows"], skip_texts=literal_specials) == []
    vocab_file = str(TOKENIZER_DIR / "tokenizer.model")
    splitting = baichuan.BaichuanTokenizer(vocab_file=vocab_file, split_special_tokens=True)
    assert _mismatches(splitting, expected["rows"]) == []


def test_load_function_padding_side_and_batch_padding(reference, baichuan, tmp_path):
    folder = _hub_folder(tmp_path, "baichuan2_13b_chat_hub_config")
    tokenizer = baichuan.load_baichuan_tokenizer(folder, padding_side="left", trust_remote_code=True)
    assert type(tokenizer) is baichuan.BaichuanTokenizer and tokenizer.padding_side == "left"
    batch = tokenizer(["你好", "百川智能是一家人工智能公司"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id == 0
    assert batch["attention_mask"][0][0] == 0
    assert batch["attention_mask"][1] == [1] * len(batch["input_ids"][1])


def test_save_and_reload_keeps_bos_eos_behaviour(reference, hub_tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = hub_tokenizers["baichuan2_13b_chat_hub_config"]
    tokenizer.save_pretrained(tmp_path)
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as handle:
        saved = json.load(handle)
    # transformers 5 drops these two keys; without them the hub class would default to add_bos_token=True.
    assert saved["add_bos_token"] is False and saved["add_eos_token"] is False
    assert saved["tokenizer_class"] == "BaichuanTokenizer"
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    rows = reference["configs"]["baichuan2_13b_chat_hub_config"]["rows"]
    assert _mismatches(reloaded, rows) == []


def test_chat_role_tokens_and_templates(hub_tokenizers, baichuan):
    """The baichuan_chat and human_assistant templates produce the expected ids with this tokenizer."""
    from component.data import template as template_module
    from component.data.conversation import Conversation, Turn
    from component.data.template import BAICHUAN_ASSISTANT_TOKEN_ID, BAICHUAN_USER_TOKEN_ID

    tokenizer = hub_tokenizers["baichuan2_13b_chat_hub_config"]
    assert tokenizer.convert_tokens_to_ids(["<reserved_106>", "<reserved_107>"]) == [
        BAICHUAN_USER_TOKEN_ID,
        BAICHUAN_ASSISTANT_TOKEN_ID,
    ]
    turns = [Turn("你好", "你好！有什么可以帮你？"), Turn("介绍一下百川", "百川是大模型。")]
    conversation = Conversation(turns)
    user = [tokenizer.encode(t.user, add_special_tokens=False) for t in conversation.turns]
    reply = [tokenizer.encode(t.assistant, add_special_tokens=False) for t in conversation.turns]

    chat = template_module.get_template("baichuan_chat", tokenizer).encode(conversation, max_seq_length=512)
    expected_ids = []
    expected_labels = []
    for u, r in zip(user, reply, strict=True):
        prompt = [195, *u, 196]
        expected_ids += prompt + r + [2]
        expected_labels += [-100] * len(prompt) + r + [2]
    assert chat.input_ids == expected_ids
    assert chat.labels == expected_labels

    human_template = template_module.get_template("human_assistant", tokenizer)
    human = human_template.encode(conversation, max_seq_length=512)
    first = [1, *tokenizer.encode("Human: 你好\n\nAssistant: ", add_special_tokens=False)]
    assert human.input_ids[: len(first)] == first
    assert human.input_ids[len(first) : len(first) + len(reply[0]) + 1] == reply[0] + [2]
    assert human.input_ids.count(2) == 2 and human.input_ids.count(1) == 1
