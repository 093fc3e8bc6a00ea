"""Opt-in (`make check-llamacpp`, not in CI): our GGUF files run in llama.cpp as the models run in transformers.

Needs LLAMA_CPP_BIN = the folder cpp/build.sh printed (llm_logits, llm_chat); skipped otherwise.
- Logits of a prompt at every position: f32 within 1e-3 of transformers (f16 / q8_0 differences printed);
  greedy generation token for token (f32), on the demo-shaped Llama, a Qwen2-style BPE model and the four
  Baichuan variants (32 layers = RoPE, 40 = ALiBi, as llama.cpp decides).
- llama.cpp's tokenizer gives our tokenizers' ids on the prompts used.
- The C++ chat answers the demo's held-out questions exactly as `generate.py compare` (greedy) does on the
  fine-tuned demo model (output/demo from `make demo`; skipped when absent).
Every measured number is printed (run with -s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from component.export.gguf import write_gguf
from component.model.loader import load_pretrained, load_tokenizer
from tests.export.tiny_models import BAICHUAN_TOKENIZER, BAICHUAN_VARIANTS, build_baichuan, build_qwen2
from tests.utils import REPO, opt_in, skip_without_demo

BIN = Path(os.environ.get("LLAMA_CPP_BIN", ""))
pytestmark = pytest.mark.skipif(
    not (BIN / "llm_logits").is_file(),
    reason=opt_in("the llama.cpp build (LLAMA_CPP_BIN, cpp/build.sh's output)", "make check-llamacpp"),
)
PROMPTS = {
    "llama": "Human: 把 8854 逐位写成汉字\n\nAssistant: 八八五四",
    "qwen2": "Human: hello world, it's a test!\n\nAssistant: Yes 1234",
    "baichuan": "<reserved_106>你好，世界! Hello 2024<reserved_107>",
}
GENERATE = 12


def run(*command: str, stdin: str | None = None) -> str:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def llama_cpp(gguf: Path, tokens: list[int]) -> tuple[np.ndarray, list[int]]:
    out = json.loads(
        run(
            str(BIN / "llm_logits"),
            "-m",
            str(gguf),
            "--tokens",
            ",".join(map(str, tokens)),
            "--generate",
            str(GENERATE),
        )
    )
    return np.array(out["logits"], dtype=np.float32), out["generated"]


@torch.no_grad()
def transformers_reference(folder: Path, tokens: list[int]) -> tuple[np.ndarray, list[int]]:
    model = load_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([tokens])
    logits = model(input_ids=ids).logits[0].numpy()
    generated = []
    for _ in range(GENERATE):  # plain greedy: the argmax of a full forward, no stop tokens
        next_id = int(model(input_ids=ids).logits[0, -1].argmax())
        generated.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return logits, generated


def model_folders(tmp: Path, demo_tokenizer) -> dict[str, tuple[Path, str]]:
    from component.demo_assets import build_tiny_model

    config = json.loads((REPO / "config/demo/model/config.json").read_text())  # the demo's Llama, random weights
    demo = build_tiny_model(tmp / "demo_llama", config=config, tokenizer=demo_tokenizer)
    folders = {"demo llama": (demo, "llama"), "qwen2 (BPE)": (build_qwen2(tmp / "q"), "qwen2")}
    if BAICHUAN_TOKENIZER.is_dir():
        for variant in BAICHUAN_VARIANTS:
            folders[variant] = (build_baichuan(tmp / variant, variant), "baichuan")
    return folders


def test_logits_and_greedy_match_transformers(demo_tokenizer, tmp_path):
    rows, failures = [], []
    for label, (folder, kind) in model_folders(tmp_path, demo_tokenizer).items():
        tokenizer = load_tokenizer(str(folder))
        text_ids = tokenizer(PROMPTS[kind], add_special_tokens=False)["input_ids"]
        tokens = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + text_ids
        reference, reference_tokens = transformers_reference(folder, tokens)
        for gguf_type in ("f32", "f16", "q8_0"):
            path = write_gguf(folder, tmp_path / f"{label}-gguf".replace(" ", "_"), gguf_type)
            if gguf_type == "f32":  # llama.cpp's tokenizer on the same text
                ids = json.loads(run(str(BIN / "llm_logits"), "-m", str(path), "--tokenize", PROMPTS[kind]))["tokens"]
                if ids != text_ids:
                    failures.append(f"{label}: llama.cpp tokenizes {ids}, transformers {text_ids}")
            logits, generated = llama_cpp(path, tokens)
            diff = float(np.abs(logits - reference).max())
            same = generated == reference_tokens
            rows.append(
                f"{label:22s} {len(tokens):2d} tokens  {gguf_type:5s} max|logit diff| {diff:.2e}  (|logits| <= "
                f"{np.abs(reference).max():.2f})  greedy {GENERATE} tokens identical: {same}"
            )
            if gguf_type == "f32" and (diff > 1e-3 or not same):
                failures.append(rows[-1])
    print("\nllama.cpp vs transformers, logits at every prompt position:\n" + "\n".join(rows))
    assert not failures, failures


def demo_folder() -> Path:
    skip_without_demo("output/demo/sft")
    return REPO / "output" / "demo"


def test_cpp_chat_matches_generate_py_on_the_demo(tmp_path):
    demo = demo_folder()
    references = [json.loads(line) for line in (REPO / "data/demo/digits_eval.jsonl").read_text().splitlines()]
    command = [sys.executable, "generate.py", "compare", "--model_name_or_path", str(demo / "base_model")]
    command += ["--adapter", str(demo / "sft"), "--references", "data/demo/digits_eval.jsonl", "--preset", "greedy"]
    command += ["--max_new_tokens", "16", "--batch_size", "32", "--output_dir", str(tmp_path / "compare")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "compare" / "answers.jsonl").read_text().splitlines()]
    python_answers = [row["answer"] for row in sorted(rows, key=lambda r: r["index"]) if row["model"] != "base"]

    export = [sys.executable, "export.py", "--format", "gguf", "--adapter", str(demo / "sft")]
    export += ["--model_name_or_path", str(demo / "base_model")]
    questions = "".join(row["input"] + "\n" for row in references)
    print()
    for gguf_type in ("f32", "f16", "q8_0"):
        out = tmp_path / f"gguf_{gguf_type}"
        subprocess.run(
            [*export, "--output_dir", str(out), "--gguf_type", gguf_type], cwd=REPO, check=True, capture_output=True
        )
        answers = run(
            str(BIN / "llm_chat"),
            "-m",
            str(out / f"model-{gguf_type}.gguf"),
            "--single-turn",
            "-n",
            "16",
            stdin=questions,
        ).splitlines()
        exact = sum(a.strip() == r["target"].strip() for a, r in zip(answers, references)) / len(references)
        python_exact = sum(a == r["target"] for a, r in zip(python_answers, references)) / len(references)
        same = sum(a == b for a, b in zip(answers, python_answers))
        print(
            f"C++ chat ({gguf_type}): exact match {exact:.3f} on {len(references)} held-out questions; "
            f"generate.py compare (greedy): {python_exact:.3f}; identical answers {same}/{len(references)}"
        )
        if gguf_type == "f32":
            assert answers == python_answers
