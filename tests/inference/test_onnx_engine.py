"""The onnxruntime engine's decoding steps equal transformers' logits processors; what it refuses, it names.

(Parity of the whole graph and of greedy generation with the PyTorch model: tests/export/test_onnx.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from component.config.generation import resolve_settings
from component.config.inference import ChatOptions, CompareOptions, parse_options
from component.config.parser import ConfigError
from component.inference.onnx_engine import banned_ngram_tokens, process_logits


def _hf(scores: np.ndarray, sequence: np.ndarray, settings) -> np.ndarray:
    processors = [RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)]
    if settings.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    if settings.do_sample:
        processors += [TemperatureLogitsWarper(settings.temperature), TopKLogitsWarper(settings.top_k or 10**9)]
        processors.append(TopPLogitsWarper(settings.top_p))
    ids, out = torch.from_numpy(sequence), torch.from_numpy(scores.copy())
    for processor in processors:
        out = processor(ids, out)
    return out.numpy()


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("greedy", {"repetition_penalty": 1.3}),
        ("greedy", {"no_repeat_ngram_size": 2}),
        ("default", {}),  # temperature 0.6, top_k 50, top_p 0.8, repetition_penalty 2.0
        ("top_p", {"temperature": 0.7, "top_p": 0.5}),
        ("top_k", {"top_k": 5}),
    ],
)
def test_decoding_steps_equal_transformers_processors(preset, overrides):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 80)).astype(np.float32) * 3
    sequence = rng.integers(0, 80, size=(3, 12))
    sequence[:, -3:] = sequence[:, 2:5]  # repeated n-grams for the no-repeat rule
    settings = resolve_settings(preset, overrides)
    ours, expected = process_logits(scores, sequence, settings), _hf(scores, sequence, settings)
    assert np.array_equal(np.isinf(ours), np.isinf(expected))
    finite = ~np.isinf(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6, atol=1e-6)


def test_banned_ngram_tokens():
    assert banned_ngram_tokens(np.array([[5, 6, 7, 5, 6, 8, 5]]), 2) == [[6, 6]]
    assert banned_ngram_tokens(np.array([[5]]), 3) == [[]]


def test_onnxruntime_backend_refuses_what_it_cannot_do(tiny_llama_dir, tmp_path):
    from component.inference.backends import load_generator

    folder = ["--model_name_or_path", str(tiny_llama_dir)]
    beam = parse_options(CompareOptions, ["--backend", "onnxruntime", *folder, "--preset", "greedy,beam"])
    with pytest.raises(ConfigError, match="preset 'beam'.*--backend torch"):
        load_generator(beam)
    with pytest.raises(ConfigError, match=r"has no model\.onnx \(export\.py --format onnx\)"):
        load_generator(parse_options(ChatOptions, ["--backend", "onnxruntime", *folder]))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    merged = parse_options(ChatOptions, ["--backend", "onnxruntime", *folder, "--adapter", str(tmp_path / "adapter")])
    with pytest.raises(ConfigError, match="adapter merged in"):
        load_generator(merged)
    with pytest.raises(ConfigError, match='--backend must be one of "torch", "onnxruntime"'):
        parse_options(ChatOptions, ["--backend", "onnx", *folder])


TEXTS = ["你好，世界", "Human: 把 8854 逐位写成汉字\n\nAssistant: ", "  two  spaces\n\n", "<s>literal</s> tokens", ""]


def test_serving_tokenizer_equals_transformers_fast_tokenizer(demo_tokenizer, tmp_path):
    from component.inference.onnx_engine import ServingTokenizer

    demo_tokenizer.save_pretrained(tmp_path)
    serving = ServingTokenizer(tmp_path)
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(serving, f"{name}_token_id") == getattr(demo_tokenizer, f"{name}_token_id"), name
    for text in TEXTS:
        for special in (True, False):
            ids = demo_tokenizer(text, add_special_tokens=special)["input_ids"]
            assert serving(text, add_special_tokens=special)["input_ids"] == ids
            for skip in (True, False):
                assert serving.decode(ids, skip_special_tokens=skip) == demo_tokenizer.decode(
                    ids, skip_special_tokens=skip
                )
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    for generation_prompt in (True, False):
        assert serving.apply_chat_template(messages, add_generation_prompt=generation_prompt) == (
            demo_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        )


def test_serving_tokenizer_equals_native_baichuan_tokenizer(fixtures_dir, tmp_path):
    """Baichuan ships only tokenizer.model: the serving side reads it with sentencepiece, same ids and answers."""
    from component.inference.onnx_engine import ServingTokenizer
    from component.model.baichuan import load_baichuan_tokenizer

    native = load_baichuan_tokenizer(fixtures_dir / "tokenizers" / "baichuan2")
    native.save_pretrained(tmp_path)
    serving = ServingTokenizer(tmp_path)
    reference = json.loads((fixtures_dir / "baichuan_ref" / "tokenizer_reference.json").read_text(encoding="utf-8"))
    for text in [*reference["texts"], *TEXTS]:
        for special in (True, False):
            ids = native(text, add_special_tokens=special)["input_ids"]
            assert serving(text, add_special_tokens=special)["input_ids"] == ids, text
        assert serving.decode(ids, skip_special_tokens=True) == native.decode(ids, skip_special_tokens=True), text
    assert (serving.bos_token_id, serving.eos_token_id, serving.pad_token_id) == (1, 2, native.pad_token_id)
