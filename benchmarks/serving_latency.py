"""Greedy decoding speed of one model in every runtime we export to: PyTorch (generate.py's engine), onnxruntime,
llama.cpp (GGUF) and vLLM, on the CPU.

    python benchmarks/serving_latency.py                                  # batch 1 and 8, one repeat, all four
    python benchmarks/serving_latency.py --repeats 3 --json out.json
    python benchmarks/serving_latency.py --modes torch onnxruntime        # without llama.cpp / vLLM
    LLAMA_CPP_BIN=$(cpp/build.sh) python benchmarks/serving_latency.py --vllm-venv .venv-vllm

The model: benchmarks/common.py's MODEL_CONFIG (Llama-shaped, hidden 256, 4 layers, 8 heads of 32) with random
weights and the demo tokenizer, fp32, built once into the workdir together with its exports: the ONNX graph
(export.py's `export_decoder`) and an f32 GGUF (export.py's `write_gguf`). Every runtime decodes `--new-tokens`
tokens greedily after the same `--prompt`-token prompts (random ids; batch 8 = 8 different prompts side by side),
no early stop, `--threads` threads each:
- torch: transformers' generate() as generate.py's engine calls it (greedy, KV cache, SDPA attention);
- onnxruntime: our onnxruntime engine's loop (`OnnxDecoder.generate`, torch never imported);
- llama.cpp: cpp/llm_bench (cpp/build.sh builds it; LLAMA_CPP_BIN names the folder), f32 KV cache;
- vllm: vLLM's offline engine (`LLM.generate`, `make vllm-env`'s environment, run there), fp32, eager mode, the
  engine in the benchmark's process, its OpenMP threads bound to the first `--threads` cores.
Each run is its own process; one warm-up generation first, then the prefill alone and the whole generation are
timed. tokens/s = batch x new tokens / wall time of the generation (prefill included). Runtimes alternate; the
table gives medians over `--repeats`, and whether each runtime's tokens equal PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    MODEL_CONFIG,
    compare_speeds,
    onnx_greedy,
    random_prompts,
    timed_generations,
    torch_greedy,
)

MODES = {
    "torch": "PyTorch (generate.py's engine)",
    "onnxruntime": "onnxruntime (export.py --format onnx)",
    "llamacpp": "llama.cpp (export.py --format gguf, f32)",
    "vllm": "vLLM offline engine (export.py --format hf)",
}


def build_model(workdir: Path) -> None:
    """workdir/model (transformers folder + demo tokenizer), workdir/onnx (graph), workdir/gguf (f32 file)."""
    import torch

    from component.demo_assets import build_tiny_model
    from component.export.gguf import write_gguf
    from component.export.onnx import export_decoder
    from component.model.loader import load_pretrained

    build_tiny_model(workdir / "model", MODEL_CONFIG)
    model = load_pretrained(str(workdir / "model"), dtype=torch.float32).eval()
    (workdir / "onnx").mkdir(exist_ok=True)
    export_decoder(model, workdir / "onnx" / "model.onnx")
    model.config.save_pretrained(workdir / "onnx")
    write_gguf(workdir / "model", workdir / "gguf", "f32")


def vocab_size(workdir: Path) -> int:
    return json.loads((workdir / "model" / "config.json").read_text(encoding="utf-8"))["vocab_size"]


def run_torch(workdir: Path, batches: dict, options: argparse.Namespace) -> dict:
    import torch

    from component.model.loader import load_pretrained

    torch.set_num_threads(options.threads)
    model = load_pretrained(str(workdir / "model"), dtype=torch.float32).eval()
    return timed_generations(
        lambda batch: torch_greedy(model, batch, 1),
        lambda batch: torch_greedy(model, batch, options.new_tokens),
        batches,
    )


def run_onnxruntime(workdir: Path, batches: dict, options: argparse.Namespace) -> dict:
    from component.inference.onnx_engine import OnnxDecoder

    decoder = OnnxDecoder(workdir / "onnx", threads=options.threads)
    return timed_generations(
        lambda batch: onnx_greedy(decoder, batch, 1),
        lambda batch: onnx_greedy(decoder, batch, options.new_tokens),
        batches,
    )


def run_llamacpp(workdir: Path, batches: dict, options: argparse.Namespace) -> dict:
    """llm_bench times itself (warm-up, prefill, generation) inside one process per batch size."""
    gguf = next((workdir / "gguf").glob("*.gguf"))
    results = {}
    for size, batch in batches.items():
        tokens = ";".join(",".join(map(str, prompt)) for prompt in batch)
        command = [str(Path(options.llama_cpp_bin) / "llm_bench"), "-m", str(gguf), "--tokens", tokens]
        command += ["--new-tokens", str(options.new_tokens), "-t", str(options.threads)]
        out = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        results[size] = {
            "seconds": out["seconds"],
            "prefill_seconds": out["prefill_seconds"],
            "tokens": out["generated"],
        }
    return results


def run_vllm(workdir: Path, batches: dict, options: argparse.Namespace) -> dict:
    """In vLLM's environment (this script rerun by its Python); imports vLLM, never our component package."""
    from vllm import LLM, SamplingParams

    longest = options.prompt + options.new_tokens
    llm = LLM(
        model=str(workdir / "model"),
        dtype="float32",
        enforce_eager=True,
        seed=0,
        max_model_len=longest + 8,
        max_num_seqs=max(options.batch_sizes),
        max_num_batched_tokens=max(2048, max(options.batch_sizes) * longest),
        distributed_executor_backend="uni",
    )

    def generate(batch, new_tokens=options.new_tokens):
        params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]

    return timed_generations(lambda batch: generate(batch, 1), generate, batches)


RUNNERS = {"torch": run_torch, "onnxruntime": run_onnxruntime, "llamacpp": run_llamacpp, "vllm": run_vllm}


def worker_command(mode: str, workdir: Path, options: argparse.Namespace) -> list[str]:
    python = str(Path(options.vllm_venv) / "bin" / "python") if mode == "vllm" else sys.executable
    command = [python, __file__, "--worker", mode, "--workdir", str(workdir), "--threads", str(options.threads)]
    command += ["--prompt", str(options.prompt), "--new-tokens", str(options.new_tokens)]
    command += ["--batch-sizes", *map(str, options.batch_sizes), "--llama-cpp-bin", options.llama_cpp_bin or ""]
    return command


def worker_environment(options: argparse.Namespace) -> None:
    """Variables the runtimes read at start-up, set before a worker is started (each worker inherits them)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(options.threads)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in the worker's process, as the others
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{options.threads - 1}"
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ.pop("PYTHONPATH", None)


def check_runtimes(options: argparse.Namespace) -> None:
    if "llamacpp" in options.modes and not (Path(options.llama_cpp_bin or "") / "llm_bench").is_file():
        raise SystemExit(
            "llama.cpp: no llm_bench in LLAMA_CPP_BIN / --llama-cpp-bin; build it: LLAMA_CPP_BIN=$(cpp/build.sh)"
        )
    if "vllm" in options.modes and not (Path(options.vllm_venv) / "bin" / "python").is_file():
        raise SystemExit(
            f"vLLM: no environment at {options.vllm_venv}; build it: make vllm-env (or --modes without vllm)"
        )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every runtime")
    parser.add_argument("--llama-cpp-bin", default=os.environ.get("LLAMA_CPP_BIN"), help="cpp/build.sh's folder")
    parser.add_argument("--vllm-venv", default=str(REPO / ".venv-vllm"), help="make vllm-env's environment")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model and its exports here")
    parser.add_argument("--json", type=Path, default=None, help="also write every run and the table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)

    if options.worker:
        vocab = vocab_size(options.workdir)
        batches = {str(size): random_prompts(size, options.prompt, vocab) for size in options.batch_sizes}
        print("RESULT " + json.dumps(RUNNERS[options.worker](options.workdir, batches, options)), flush=True)
        return

    check_runtimes(options)
    worker_environment(options)
    with tempfile.TemporaryDirectory(prefix="serving_latency_") as temporary:
        workdir = options.workdir or Path(temporary)
        if not (workdir / "gguf").is_dir():
            print("building the model and its exports ...", flush=True)
            build_model(workdir)
        settings = f"prompt {options.prompt}, {options.new_tokens} new tokens, vocab {vocab_size(workdir)}"
        compare_speeds(
            options.modes,
            options.repeats,
            lambda mode: worker_command(mode, workdir, options),
            MODES,
            options.new_tokens,
            f"{settings}, {options.threads} threads",
            options.json,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
