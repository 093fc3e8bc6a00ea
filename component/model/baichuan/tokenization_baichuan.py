"""Baichuan / Baichuan2 tokenizer without the hub's remote code.

The hub ships `tokenizer.model` (SentencePiece BPE with byte fallback, identity normaliser, no dummy prefix)
and a `BaichuanTokenizer` class that breaks on transformers >= 4.34. This class reimplements it on
transformers 5's SentencePiece backend and gives the same ids, tokens and decodes:

- `add_bos_token` / `add_eos_token` as in the hub `tokenizer_config.json` (both false there; the class
  defaults, used only without a config, are bos on / eos off like the original class);
- special tokens written in the text (`<s>`, `</s>`, `<unk>`) map to their ids, with no whitespace stripping,
  and the `single_word` flag of the hub AddedTokens is ignored as the original (transformers 4.33) did;
- decoding keeps the original's quirk of a space before a special token that follows normal text.

A tokenizers-library ("fast") conversion is not used: it cannot reproduce that decode behaviour, so the
SentencePiece class is the exact one (see docs/baichuan.md).
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers.tokenization_utils_base import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


def _special(token: str | AddedToken | dict | None) -> AddedToken | None:
    """A special AddedToken with the hub flags, except `single_word`, which the original never applied."""
    if token is None:
        return None
    if isinstance(token, dict):
        token = AddedToken(**{k: v for k, v in token.items() if k != "__type"})
    if isinstance(token, str):
        return AddedToken(token, lstrip=False, rstrip=False, normalized=True, single_word=False, special=True)
    return AddedToken(
        token.content,
        lstrip=token.lstrip,
        rstrip=token.rstrip,
        normalized=token.normalized,
        single_word=False,
        special=True,
    )


class BaichuanTokenizer(SentencePieceBackend):
    """SentencePiece tokenizer equal to the hub `BaichuanTokenizer` (Baichuan and Baichuan2).

    Named like the hub class on purpose: `AutoTokenizer` resolves the `tokenizer_class` written in a hub
    `tokenizer_config.json` by name once `register_baichuan()` has run.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | AddedToken | dict = "<unk>",
        bos_token: str | AddedToken | dict = "<s>",
        eos_token: str | AddedToken | dict = "</s>",
        pad_token: str | AddedToken | dict | None = None,
        sp_model_kwargs: dict[str, Any] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.pop("legacy", None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=_special(unk_token),
            bos_token=_special(bos_token),
            eos_token=_special(eos_token),
            pad_token=_special(pad_token),
            sp_model_kwargs=sp_model_kwargs or {},
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            # The original encodes each text span with the raw SentencePiece model (no prefix handling).
            legacy=True,
            **kwargs,
        )
        # The base class may overwrite these from kwargs; the values passed here are the ones that count.
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """The original algorithm: SentencePiece-decode runs of normal pieces, special tokens verbatim.

        A special token that follows normal text gets a space in front of it (a quirk of the hub class that
        decode() therefore reproduces). Added tokens outside the SentencePiece vocabulary are kept verbatim.
        """
        special_tokens = set(self.all_special_tokens)
        base_size = self.sp_model.piece_size()
        added_tokens = {token for token, index in self._added_tokens_encoder.items() if index >= base_size}
        current_sub_tokens: list[str] = []
        out_string = ""
        prev_is_special = False
        for i, token in enumerate(tokens):
            if token in special_tokens:
                if not prev_is_special and i != 0:
                    out_string += " "
                out_string += self.sp_model.decode(current_sub_tokens) + token
                prev_is_special = True
                current_sub_tokens = []
            elif token in added_tokens:
                out_string += self.sp_model.decode(current_sub_tokens) + token
                current_sub_tokens = []
                prev_is_special = False
            else:
                current_sub_tokens.append(token)
                prev_is_special = False
        out_string += self.sp_model.decode(current_sub_tokens)
        return out_string

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output = output + bos + token_ids_1 + eos
        return output

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(
                token_ids_0=token_ids_0, token_ids_1=token_ids_1, already_has_special_tokens=True
            )
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask = mask + bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = [0] * len(bos + token_ids_0 + eos)
        if token_ids_1 is not None:
            output += [1] * len(bos + token_ids_1 + eos)
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple:
        """Save as usual, then restore `add_bos_token`/`add_eos_token`, which transformers 5 drops.

        Without them the hub class (and this one) would fall back to add_bos_token=True on reload.
        """
        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        name = (prefix + "-" if prefix else "") + "tokenizer_config.json"
        config_file = os.path.join(str(save_directory), name)
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as handle:
                config = json.load(handle)
            config["add_bos_token"] = self.add_bos_token
            config["add_eos_token"] = self.add_eos_token
            config["tokenizer_class"] = "BaichuanTokenizer"
            with open(config_file, "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2, ensure_ascii=False, sort_keys=True)
                handle.write("\n")
        return files


__all__ = ["BaichuanTokenizer"]
