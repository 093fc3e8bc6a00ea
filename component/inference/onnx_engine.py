"""The onnxruntime generation engine: an `export.py --format onnx` folder answered with numpy + onnxruntime.

No torch here (nor transformers, which imports it): the serving side needs only numpy, onnxruntime, tokenizers
and jinja2. The graph is the KV-cache decoder of `component.export.onnx` (inputs input_ids, attention_mask,
position_ids, past_key_values.{i}.key/value; outputs logits, present.{i}.key/value), run once on the
left-padded prompts and then once per new token. Decoding follows transformers' generate(): repetition
penalty and no-repeat n-grams over the whole row (padding included), then temperature, top-k, top-p, then
argmax or a draw; finished rows are fed the pad token. Greedy answers equal the PyTorch engine's token for
token; sampled ones draw from numpy's generator (seeded with `seed`), so they differ from torch's draws.
Beam search is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from component.config.generation import GenerationSettings
from component.config.inference import ModelOptions
from component.config.parser import ConfigError
from component.data.template import Template, get_template
from component.inference.answers import clean_answer, room_to_answer, stop_strings

GRAPH_FILE = "model.onnx"
NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


# --- tokenizer -----------------------------------------------------------------------------------------------------
def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class ServingTokenizer:
    """The exported folder's tokenizer without transformers, with the slice of its API the templates and answer
    cleaning use (call, decode, special-token ids, chat template): `tokenizer.json` through the `tokenizers`
    library, or, for SentencePiece-only tokenizers (Baichuan's `tokenizer.model`), the `sentencepiece` model
    itself, encoding each text span as the native Baichuan tokenizer does."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self._sentencepiece = None
            token_to_id = self._tokenizer.token_to_id
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece

            self._tokenizer = None
            self._sentencepiece = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self._add_bos, self._add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
            unknown = self._sentencepiece.unk_id()

            def token_to_id(text: str) -> int | None:
                index = self._sentencepiece.piece_to_id(text)
                return None if index == unknown and text != self._sentencepiece.id_to_piece(unknown) else index

        else:
            raise ConfigError(
                f"'model_name_or_path' {str(folder)!r} has no tokenizer.json or tokenizer.model "
                "(export.py --format onnx writes the tokenizer next to model.onnx)"
            )
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        for name in ("bos", "eos", "pad", "unk"):
            text = _token_text(config.get(f"{name}_token"))
            setattr(self, f"{name}_token", text)
            setattr(self, f"{name}_token_id", token_to_id(text) if text else None)
        if self.pad_token_id is None:  # as the PyTorch loader: borrow UNK, else EOS
            self.pad_token, self.pad_token_id = (
                (self.unk_token, self.unk_token_id)
                if self.unk_token_id is not None
                else (self.eos_token, self.eos_token_id)
            )
        self._special = {
            t: i
            for t, i in (
                (self.bos_token, self.bos_token_id),
                (self.eos_token, self.eos_token_id),
                (self.unk_token, self.unk_token_id),
            )
            if t and i is not None
        }
        template_file = folder / "chat_template.jinja"
        self.chat_template = (
            template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        )
        limit = config.get("model_max_length")
        self.model_max_length = limit if isinstance(limit, int) else None

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._tokenizer is not None:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        ids = []  # special tokens written in the text map to their ids; the spans between are encoded raw
        pattern = "(" + "|".join(re.escape(token) for token in self._special) + ")"
        for span in re.split(pattern, text) if self._special else [text]:
            ids += [self._special[span]] if span in self._special else self._sentencepiece.encode(span) if span else []
        bos = [self.bos_token_id] if add_special_tokens and self._add_bos and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if add_special_tokens and self._add_eos and self.eos_token_id is not None else []
        return bos + ids + eos

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self._encode(texts, add_special_tokens)}
        if self._tokenizer is not None:
            encoded = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
            return {"input_ids": [item.ids for item in encoded]}
        return {"input_ids": [self._encode(text, add_special_tokens) for text in texts]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self._tokenizer is None:
            specials = set(self._special.values())
            pieces, text = [], ""
            for index in ids:  # SentencePiece runs decoded together; special tokens verbatim
                if index in specials:
                    text += self._sentencepiece.decode(pieces) + (
                        "" if skip_special_tokens else self._sentencepiece.id_to_piece(index)
                    )
                    pieces = []
                else:
                    pieces.append(index)
            return text + self._sentencepiece.decode(pieces)
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:  # transformers' clean_up_tokenization
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
                text = text.replace(before, after)
            for suffix in ("'m", "'s", "'ve", "'re"):
                text = text.replace(" " + suffix, suffix)
        return text

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        specials = {f"{name}_token": getattr(self, f"{name}_token") for name in ("bos", "eos", "pad", "unk")}
        return environment.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **specials, **kwargs
        )


# --- the graph -----------------------------------------------------------------------------------------------------
class OnnxDecoder:
    """One onnxruntime session over model.onnx; `step` runs the graph, `generate` decodes a batch."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime

        folder = Path(folder)
        if not (folder / GRAPH_FILE).is_file():
            raise ConfigError(f"'model_name_or_path' {str(folder)!r} has no {GRAPH_FILE} (export.py --format onnx)")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            str(folder / GRAPH_FILE), options, providers=["CPUExecutionProvider"]
        )
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self.config = SimpleNamespace(**config)  # what context_length() reads
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        first = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.cache_dtype = NUMPY_DTYPES[first.type]
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype) for _ in self.past_names]

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [batch, seq, vocab] (float32) and the new cache, for `input_ids` after `past`."""
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip(self.past_names, past))
        logits, *present = self.session.run(self.output_names, feed)
        return logits.astype(np.float32, copy=False), present

    def generate(
        self,
        prompts: list[list[int]],
        settings: GenerationSettings,
        max_new_tokens: int,
        pad_token_id: int,
        stop_token_ids: list[int],
        rng: np.random.Generator,
        finished_text: Callable[[list[int]], bool] | None = None,
        on_tokens: Callable[[np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """New tokens [batch, steps] for left-padded `prompts`; rows that stopped are padded with `pad_token_id`.

        `finished_text(tokens)` says when a row's text has reached a stop string; `on_tokens` sees each step's
        tokens (streaming)."""
        check_settings([settings])
        width = max(len(p) for p in prompts)
        ids = np.array([[pad_token_id] * (width - len(p)) + p for p in prompts], dtype=np.int64)
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
        positions = np.where(mask == 0, 1, mask.cumsum(-1) - 1)  # as transformers' generate()
        logits, past = self.step(ids, mask, positions, self.empty_cache(len(prompts)))
        stops = np.array(sorted(set(stop_token_ids)), dtype=np.int64)
        unfinished = np.ones(len(prompts), dtype=bool)
        sequence, new = ids, []
        for _ in range(max_new_tokens):
            scores = process_logits(logits[:, -1, :], sequence, settings)
            tokens = next_tokens(scores, settings, rng)
            tokens = np.where(unfinished, tokens, pad_token_id)
            new.append(tokens)
            if on_tokens is not None:
                on_tokens(tokens)
            sequence = np.concatenate([sequence, tokens[:, None]], axis=1)
            unfinished &= ~np.isin(tokens, stops)
            if finished_text is not None:  # decoded only for the rows still running
                generated = np.stack(new, axis=1)
                for row in np.flatnonzero(unfinished):
                    unfinished[row] = not finished_text(generated[row].tolist())
            if not unfinished.any():
                break
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            position = mask.sum(-1, keepdims=True) - 1
            logits, past = self.step(tokens[:, None], mask, position, past)
        return np.stack(new, axis=1) if new else np.zeros((len(prompts), 0), dtype=np.int64)


def check_settings(settings_list: list[GenerationSettings]) -> None:
    """What this engine cannot do, refused up front: beam search."""
    for settings in settings_list:
        if settings.num_beams > 1:
            raise ConfigError(
                f"preset '{settings.preset}': the onnxruntime backend decodes greedily or by sampling; beam search "
                "(num_beams > 1) needs --backend torch"
            )


# --- decoding ------------------------------------------------------------------------------------------------------
def process_logits(scores: np.ndarray, sequence: np.ndarray, settings: GenerationSettings) -> np.ndarray:
    """transformers' logits processors in its order: repetition penalty, no-repeat n-grams, temperature,
    top-k, top-p (the last three only when sampling)."""
    scores = scores.astype(np.float32, copy=True)
    if settings.repetition_penalty != 1.0:
        rows = np.arange(len(scores))[:, None]
        seen = scores[rows, sequence]
        scores[rows, sequence] = np.where(
            seen < 0, seen * settings.repetition_penalty, seen / settings.repetition_penalty
        )
    if settings.no_repeat_ngram_size > 0:
        for row, banned in enumerate(banned_ngram_tokens(sequence, settings.no_repeat_ngram_size)):
            scores[row, banned] = -np.inf
    if not settings.do_sample:
        return scores
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    if 0 < settings.top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -settings.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if settings.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers' TopPLogitsWarper
        ordered = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(softmax(ordered), axis=-1)
        remove = cumulative <= 1 - settings.top_p
        remove[:, -1] = False  # keep at least the likeliest token
        scores = scores.copy()
        np.put_along_axis(scores, order, np.where(remove, -np.inf, ordered), axis=-1)
    return scores


def banned_ngram_tokens(sequence: np.ndarray, size: int) -> list[list[int]]:
    """Per row, the tokens that would repeat an n-gram of `size` already in the row."""
    banned = []
    for row in sequence.tolist():
        if len(row) + 1 < size:
            banned.append([])
            continue
        prefix = tuple(row[len(row) - size + 1 :])
        banned.append([row[i + size - 1] for i in range(len(row) - size + 1) if tuple(row[i : i + size - 1]) == prefix])
    return banned


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def next_tokens(scores: np.ndarray, settings: GenerationSettings, rng: np.random.Generator) -> np.ndarray:
    if not settings.do_sample:
        return scores.argmax(axis=-1)
    probabilities = softmax(scores.astype(np.float64))
    return np.array([rng.choice(len(p), p=p / p.sum()) for p in probabilities], dtype=np.int64)


# --- answering -----------------------------------------------------------------------------------------------------
@dataclass
class OnnxGenerator:
    """An exported model ready to answer: graph, tokenizer, template (what load_for_generation gives for torch)."""

    decoder: OnnxDecoder
    tokenizer: ServingTokenizer
    template: Template

    @property
    def config(self) -> SimpleNamespace:
        return self.decoder.config

    def generate(
        self,
        prompts: list[list[int]],
        settings: GenerationSettings,
        max_new_tokens: int,
        rng: np.random.Generator,
        on_tokens: Callable[[np.ndarray], None] | None = None,
    ) -> np.ndarray:
        stops = stop_strings(self.template)

        def finished_text(tokens: list[int]) -> bool:
            return any(stop in self.tokenizer.decode(tokens, skip_special_tokens=True) for stop in stops)

        return self.decoder.generate(
            prompts,
            settings,
            max_new_tokens,
            self.tokenizer.pad_token_id,
            self.template.stop_token_ids,
            rng,
            finished_text if stops else None,
            on_tokens,
        )

    def answer(self, tokens: np.ndarray) -> str:
        return clean_answer(tokens.tolist(), self.tokenizer, self.template)


def generate_answers(
    generator: OnnxGenerator,
    prompts: list[list[int]],
    settings: GenerationSettings,
    batch_size: int = 8,
    context: int | None = None,
) -> list[str]:
    """Answers to token-id prompts, `batch_size` at a time, left-padded (the PyTorch engine's contract)."""
    rng = np.random.default_rng(settings.seed)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        room = room_to_answer(settings, max(len(p) for p in batch), context)
        answers += [generator.answer(row) for row in generator.generate(batch, settings, room, rng)]
    return answers


def template_name(options: ModelOptions) -> str:
    """--template, else the one the exported weights were trained with (train_args.json), else human_assistant."""
    if options.template:
        return options.template
    file = Path(options.model_name_or_path) / "train_args.json"
    saved = json.loads(file.read_text(encoding="utf-8")).get("template") if file.is_file() else None
    return saved or "human_assistant"


def load_onnx_generator(options: ModelOptions) -> OnnxGenerator:
    """The exported folder `options.model_name_or_path` (adapters are merged at export, so none here)."""
    if options.adapters():
        raise ConfigError(
            "--backend onnxruntime runs an exported graph, which has its adapter merged in: drop 'adapter' and "
            "export base + adapter with `export.py --format onnx --adapter ...`"
        )
    if options.quantization:
        raise ConfigError("'quantization' (bitsandbytes) applies to --backend torch only")
    decoder = OnnxDecoder(options.model_name_or_path)
    tokenizer = ServingTokenizer(options.model_name_or_path)
    return OnnxGenerator(decoder, tokenizer, get_template(template_name(options), tokenizer))
