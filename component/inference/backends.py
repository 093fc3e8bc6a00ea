"""Which engine answers: a PyTorch model (`engine`) or an exported ONNX graph on onnxruntime (`onnx_engine`).

Each engine is imported only when chosen, so `--backend onnxruntime` runs where torch is not installed.
"""

from __future__ import annotations

from typing import Any

from component.config.inference import GenerationOptions
from component.data.template import Template


def load_generator(options: GenerationOptions) -> tuple[Any, Any, Template]:
    """(model, tokenizer, template): a PyTorch model with its adapters, or an onnxruntime generator."""
    if options.backend == "onnxruntime":
        from component.inference.onnx_engine import check_settings, load_onnx_generator

        check_settings(options.settings())  # before the graph loads
        generator = load_onnx_generator(options)
        return generator, generator.tokenizer, generator.template
    from component.inference.engine import load_for_generation

    return load_for_generation(options)
