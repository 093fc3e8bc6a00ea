"""GGUF tokenizer metadata: the model folder's tokenizer as llama.cpp's vocabulary.

Two kinds, read from the files the folder ships (never from a hub):
- SentencePiece (`tokenizer.model`: Baichuan, Llama-2 style) -> tokenizer model "llama": pieces, scores and
  piece types as the .model file has them, `add_space_prefix` from its normaliser (Baichuan has none).
- Byte-level BPE (`tokenizer.json`: Qwen2, GPT-2 style, the demo's) -> tokenizer model "gpt2": the byte-level
  token strings, merges, and the pre-tokenizer llama.cpp should split text with (matched from the regex).
Special token ids and whether BOS/EOS are added come from the loaded transformers tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from component.config.parser import ConfigError

# Pre-tokenizer regexes of tokenizer.json files -> llama.cpp's pre-tokenizer name (llama-vocab.cpp).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEX_PRE = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}


@dataclass
class Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)


def read_vocab(folder: str | Path, tokenizer, vocab_size: int) -> Vocab:
    """The vocabulary of `folder`, padded with unused entries up to the model's `vocab_size` rows."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():  # SentencePiece is the source when both exist (Llama-2 folders)
        vocab = _sentencepiece_vocab(folder / "tokenizer.model")
    elif (folder / "tokenizer.json").is_file():
        vocab = _bpe_vocab(folder / "tokenizer.json")
    else:
        raise ConfigError(f"{folder}: no tokenizer.json or tokenizer.model to write the GGUF vocabulary from")
    if len(vocab.tokens) > vocab_size:
        raise ConfigError(
            f"{folder}: the tokenizer has {len(vocab.tokens)} tokens but the model only {vocab_size} embedding rows"
        )
    for index in range(len(vocab.tokens), vocab_size):  # models often pad their embedding matrix
        vocab.tokens.append(f"[PAD{index}]")
        vocab.types.append(gguf.TokenType.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-10000.0)
    names = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id}
    names["pad"] = tokenizer.pad_token_id
    vocab.special_ids = {kind: token_id for kind, token_id in names.items() if token_id is not None}
    probe = tokenizer("a")["input_ids"]
    vocab.add_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    vocab.add_eos = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    return vocab


def _sentencepiece_vocab(model_file: Path) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    # SentencePiece piece types (NORMAL=1 .. BYTE=6) are numbered as gguf.TokenType.
    return Vocab(
        model="llama",
        pre="default",
        tokens=[piece.piece for piece in proto.pieces],
        types=[piece.type for piece in proto.pieces],
        scores=[piece.score for piece in proto.pieces],
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
    )


def _bpe_vocab(tokenizer_file: Path) -> Vocab:
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"{tokenizer_file}: model type {model.get('type')!r} is not supported for GGUF (BPE only)")
    by_id = {token_id: token for token, token_id in model["vocab"].items()}
    types = {token_id: gguf.TokenType.NORMAL for token_id in by_id}
    for added in data.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(by_id) + 1
    missing = [index for index in range(size) if index not in by_id]
    if missing:
        raise ConfigError(f"{tokenizer_file}: token ids are not contiguous (first gap at id {missing[0]})")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or []]
    return Vocab(
        model="gpt2",
        pre=pre_tokenizer_name(data.get("pre_tokenizer"), tokenizer_file),
        tokens=[by_id[index] for index in range(size)],
        types=[types[index] for index in range(size)],
        merges=merges,
    )


def pre_tokenizer_name(pre_tokenizer: dict | None, source: Path) -> str:
    """llama.cpp's pre-tokenizer for a byte-level BPE's `pre_tokenizer` section.

    A Split on Qwen2's or Llama 3's regex is that model's. A ByteLevel that splits with its own (GPT-2) regex is
    "gpt-2", also when Digits / Han-character splits come before it (the demo tokenizer): merges never cross those
    boundaries because they were learned with them, so llama.cpp's GPT-2 split gives the same tokens except on
    runs of two or more spaces right before a digit or a Han character.
    """
    steps = (pre_tokenizer or {}).get("pretokenizers") or ([pre_tokenizer] if pre_tokenizer else [])
    kinds = [step.get("type") for step in steps]
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if regex in SPLIT_REGEX_PRE:
            return SPLIT_REGEX_PRE[regex]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if byte_level and byte_level[-1].get("use_regex", True):
        return "gpt-2"
    raise ConfigError(
        f"{source}: pre-tokenizer {kinds} has no llama.cpp equivalent we know; supported: a ByteLevel with its "
        "GPT-2 regex (optionally after Digits / Split steps), or a Split on the Qwen2 or Llama 3 regex"
    )
