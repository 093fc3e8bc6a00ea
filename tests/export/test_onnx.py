"""export.py --format onnx: the KV-cache decoder graph on onnxruntime equals our PyTorch model.

For a Llama (exported from base + LoRA through export.py's code), a Qwen2 (GQA, q/k/v biases) and the four
native Baichuan variants (the two reference checkpoints in tests/fixtures: Baichuan-13B ALiBi and
Baichuan2-7B RoPE + NormHead; and Baichuan-7B RoPE, Baichuan2-13B ALiBi + NormHead built from configs):
fp32 logits within 1e-4 for left-padded prompts of different lengths without a cache and over 8 cached decode
steps, and greedy generation token for token. Each model is exported once per module (export is the slow part).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from component.config.generation import resolve_settings  # noqa: E402
from component.config.inference import ExportOptions  # noqa: E402
from component.export.onnx import cache_names, export_decoder, export_onnx  # noqa: E402
from component.inference.onnx_engine import OnnxDecoder  # noqa: E402
from tests.utils import REPO, skip_without_demo  # noqa: E402

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2  # fp16 graph vs the fp32 PyTorch model, on logits of magnitude ~1 (docs/export.md)
LENGTHS = (7, 4, 2)  # one batch, left-padded
DECODE_STEPS = 8
BAICHUAN_REF = "baichuan_ref"
TINY_BAICHUAN = {  # the reference checkpoints' shape
    "model_type": "baichuan",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 256,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
BUILT = {
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
    # Baichuan-7B: RoPE, plain head; Baichuan2-13B: ALiBi, NormHead (the other two come from the fixtures).
    # One layer each: export time grows with the layers, and the 2-layer models cover the per-layer cache.
    "baichuan_7b": {**TINY_BAICHUAN, "num_hidden_layers": 1, "use_alibi": False, "use_norm_head": False},
    "baichuan2_13b": {**TINY_BAICHUAN, "num_hidden_layers": 1, "use_alibi": True, "use_norm_head": True},
}
MODELS = ["llama", "qwen2", "baichuan_13b_h4", "baichuan2_7b_h4", "baichuan_7b", "baichuan2_13b"]


def _lora_adapter(base: Path, folder: Path) -> Path:
    """A LoRA adapter with random non-zero weights, so the merge visibly changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(folder)
    (folder / "train_args.json").write_text(json.dumps({"template": "human_assistant"}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, tiny_llama_dir):
    """export.py's whole path on the suite's tiny Llama: base + LoRA adapter, merged, exported; (merged model, folder)."""
    from peft import PeftModel

    tmp = tmp_path_factory.mktemp("onnx_llama")
    adapter = _lora_adapter(tiny_llama_dir, tmp / "adapter")
    output = tmp / "onnx"
    export_onnx(
        ExportOptions(
            format="onnx", model_name_or_path=str(tiny_llama_dir), adapter=str(adapter), output_dir=str(output)
        )
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval(), output


def _reference_model(name: str, output: Path, shared: Path):
    """A PyTorch model in fp32, exported to `output` (graph + config.json)."""
    import component.model  # noqa: F401  (registers the native Baichuan)

    if name in BUILT:
        torch.manual_seed(0)
        config = AutoConfig.for_model(**BUILT[name], initializer_range=0.1)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(shared / BAICHUAN_REF / name, dtype=torch.float32)
    model.eval()
    export_decoder(model, output / "model.onnx")
    model.config.save_pretrained(output)
    return model


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory, fixtures_dir):
    """(name, PyTorch model, onnxruntime decoder) per architecture, exported once for the module."""
    if request.param == "llama":
        model, folder = request.getfixturevalue("llama_export")
    else:
        folder = tmp_path_factory.mktemp(f"onnx_{request.param}")
        model = _reference_model(request.param, folder, fixtures_dir)
    return request.param, model, OnnxDecoder(folder)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length).tolist() for length in LENGTHS]


def _left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max(map(len, prompts))
    ids = np.array([[pad] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    return ids, mask, np.where(mask == 0, 1, mask.cumsum(-1) - 1)


def _torch_step(model, ids, mask, positions, cache):
    with torch.no_grad():
        output = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            past_key_values=cache,
            use_cache=True,
        )
    return output.logits.numpy(), output.past_key_values


def test_graph_inputs_and_outputs(exported):
    name, model, decoder = exported
    layers = model.config.num_hidden_layers
    inputs = {i.name: i.shape for i in decoder.session.get_inputs()}
    outputs = [o.name for o in decoder.session.get_outputs()]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *cache_names(layers, "past_key_values")]
    assert outputs == ["logits", *cache_names(layers, "present")]
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert inputs["past_key_values.0.key"][0::2] == ["batch", "past_sequence"]


def test_fp32_logits_match_pytorch_without_and_with_cache(exported):
    """Prefill a left-padded batch (no cache), then decode 8 tokens on the cache: every real position within 1e-4."""
    name, model, decoder = exported
    ids, mask, positions = _left_pad(_prompts(model.config.vocab_size))
    logits, past = decoder.step(ids, mask, positions, decoder.empty_cache(len(ids)))
    expected, cache = _torch_step(model, ids, mask, positions, None)
    real = mask.astype(bool)
    assert np.abs(logits[real] - expected[real]).max() <= FP32_TOLERANCE
    assert logits.shape == expected.shape
    worst = 0.0
    for _ in range(DECODE_STEPS):
        tokens = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
        positions = mask.sum(-1, keepdims=True) - 1
        logits, past = decoder.step(tokens, mask, positions, past)
        expected, cache = _torch_step(model, tokens, mask, positions, cache)
        worst = max(worst, float(np.abs(logits - expected).max()))
    assert worst <= FP32_TOLERANCE, f"{name}: cached decoding differs by {worst}"
    assert past[0].shape[2] == mask.shape[1]  # the present grows by one position per step


def test_greedy_generation_is_token_identical(exported):
    name, model, decoder = exported
    prompts = _prompts(model.config.vocab_size, seed=1)
    settings = resolve_settings("greedy", {"max_new_tokens": 10})
    stops = [2]
    generated = decoder.generate(prompts, settings, 10, 0, stops, np.random.default_rng(0))
    ids, mask, _ = _left_pad(prompts)
    with torch.no_grad():
        expected = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=stops,
            pad_token_id=0,
        )[:, ids.shape[1] :].numpy()
    assert generated.tolist() == expected[:, : generated.shape[1]].tolist()
    assert (expected[:, generated.shape[1] :] == 0).all()  # torch only padded after the rows all stopped


def test_export_writes_a_self_contained_folder(llama_export):
    model, folder = llama_export
    for file in ("model.onnx", "config.json", "generation_config.json", "tokenizer.json", "train_args.json"):
        assert (folder / file).is_file(), file
    assert not (folder / "model.onnx.data").exists()  # external data only past 2 GB
    info = json.loads((folder / "onnx_config.json").read_text(encoding="utf-8"))
    assert info["num_layers"] == model.config.num_hidden_layers and info["dtype"] == "float32"


def test_onnxruntime_backend_never_imports_torch(llama_export, tmp_path):
    """generate.py compare and chat on the exported folder (tokenizer, template, decode loop, reports) run on
    numpy + onnxruntime + tokenizers: torch and transformers are never imported."""
    _, folder = llama_export
    (tmp_path / "questions.txt").write_text("1234\n把 12 逐位写成汉字\n", encoding="utf-8")
    script = (
        "import io, sys\n"
        "from component.config.inference import ChatOptions, CompareOptions\n"
        "from component.inference.backends import load_generator\n"
        "from component.inference.chat import OnnxChatSession\n"
        "from component.inference.compare import run_compare\n"
        f"common = dict(backend='onnxruntime', model_name_or_path={str(folder)!r}, max_new_tokens=6)\n"
        f"result, _ = run_compare(CompareOptions(**common, questions={str(tmp_path / 'questions.txt')!r}, "
        f"preset='greedy,top_p', output_dir={str(tmp_path / 'compare')!r}))\n"
        "assert len(result.rows) == 4, result.rows\n"
        "options = ChatOptions(**common)\n"
        "session = OnnxChatSession(*load_generator(options), options.settings()[0])\n"
        "session.ask('1234', io.StringIO())\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_fp16_export_within_stated_tolerance(tmp_path, monkeypatch):
    """A float16 graph (export.py --onnx_dtype float16) against the fp32 PyTorch model: within FP16_TOLERANCE.
    Exported as if its weights were over the 2 GB protobuf limit: they go to model.onnx.data."""
    import component.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)
    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**BUILT["qwen2"], "model_type": "llama"}, initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    half = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    half.load_state_dict(model.state_dict())
    export_decoder(half, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").stat().st_size > 0  # onnxruntime reads it from next to model.onnx
    decoder = OnnxDecoder(tmp_path)
    assert decoder.cache_dtype == np.float16
    ids, mask, positions = _left_pad(_prompts(model.config.vocab_size))
    logits, past = decoder.step(ids, mask, positions, decoder.empty_cache(len(ids)))
    expected, cache = _torch_step(model, ids, mask, positions, None)
    real = mask.astype(bool)
    assert np.abs(logits[real] - expected[real]).max() <= FP16_TOLERANCE
    tokens = logits[:, -1].argmax(-1)[:, None]
    mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    logits, _ = decoder.step(tokens, mask, mask.sum(-1, keepdims=True) - 1, past)
    expected, _ = _torch_step(model, tokens, mask, mask.sum(-1, keepdims=True) - 1, cache)
    assert np.abs(logits - expected).max() <= FP16_TOLERANCE


def test_export_refuses_what_it_cannot_export(tiny_llama_dir, tmp_path):
    from component.config.parser import ConfigError

    def export(**values):
        export_onnx(ExportOptions(format="onnx", output_dir=str(tmp_path / "out"), **values))

    with pytest.raises(ConfigError, match="quantization"):
        export(model_name_or_path=str(tiny_llama_dir), quantization="4bit")
    with pytest.raises(ConfigError, match="has no config.json"):
        export(model_name_or_path=str(tmp_path))
    reward = tmp_path / "rm"
    reward.mkdir()
    (reward / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="reward-model adapter"):
        export(model_name_or_path=str(tiny_llama_dir), adapter=str(reward))
    sliding = tmp_path / "sliding"
    config = AutoConfig.for_model(**{**BUILT["qwen2"], "use_sliding_window": True, "sliding_window": 8})
    AutoModelForCausalLM.from_config(config).save_pretrained(sliding)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # so the tokenizer check passes
        (sliding / name).write_bytes((tiny_llama_dir / name).read_bytes())
    with pytest.raises(ConfigError, match="sliding-window attention"):
        export(model_name_or_path=str(sliding))
    assert not (tmp_path / "out").exists()


def test_demo_sft_export_reproduces_exact_match(tmp_path):
    """export.py on the demo's base + SFT adapter (fp32 logits within 1e-4 of base + adapter in PyTorch), then
    generate.py compare --backend onnxruntime: the demo's exact match (1.0 on the 200 held-out questions, greedy)."""
    demo = REPO / "output" / "demo"
    skip_without_demo("output/demo/base_model", "output/demo/sft")
    exported = tmp_path / "sft_onnx"
    run = [sys.executable, "export.py", "--format", "onnx", "--adapter", str(demo / "sft")]
    result = subprocess.run([*run, "--output_dir", str(exported)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(demo / "base_model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, demo / "sft").merge_and_unload().eval()
    ids, mask, positions = _left_pad(_prompts(model.config.vocab_size))
    decoder = OnnxDecoder(exported)
    logits, _ = decoder.step(ids, mask, positions, decoder.empty_cache(len(ids)))
    expected, _ = _torch_step(model, ids, mask, positions, None)
    assert np.abs(logits - expected)[mask.astype(bool)].max() <= FP32_TOLERANCE
    command = [sys.executable, "generate.py", "compare", "--backend", "onnxruntime", "--model_name_or_path"]
    command += [str(exported), "--references", "data/demo/digits_eval.jsonl", "--preset", "greedy"]
    command += ["--max_new_tokens", "16", "--batch_size", "32", "--output_dir", str(tmp_path / "compare")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "compare" / "summary.json").read_text(encoding="utf-8"))
    assert summary["results"]["greedy"]["models"]["onnx"] == {"answers": 200, "exact_match": 1.0}
    assert summary["meta"]["backend"] == "onnxruntime"
