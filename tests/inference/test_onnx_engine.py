"""The onnxruntime engine's decoding steps equal transformers' logits processors; what it refuses, it names.

(Parity of the whole graph and of greedy generation with the PyTorch model: tests/export/test_onnx.py.)
"""

from __future__ import annotations

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

pytest.importorskip("onnxruntime")


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
