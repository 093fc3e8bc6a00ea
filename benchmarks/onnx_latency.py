"""Greedy decoding speed: onnxruntime on the exported graph vs PyTorch eager, same model, CPU.

    python benchmarks/onnx_latency.py                                  # batch 1 and 8, one repeat
    python benchmarks/onnx_latency.py --repeats 3 --json out.json
    python benchmarks/onnx_latency.py --threads 1 --vocab 32000

The Llama-shaped model of benchmarks/sft_throughput.py (hidden 256, 4 layers, random weights, fp32), exported
once with `component.export.onnx.export_decoder` (the graph export.py writes). Each measurement runs in its own
process: `torch_eager` is transformers' `generate()` (greedy, KV cache, SDPA attention); `onnxruntime` is our
onnxruntime engine's loop (`OnnxDecoder.generate`, numpy + onnxruntime, torch never imported). Both decode
`--new-tokens` tokens after a `--prompt`-token prompt (no early stop) for each batch size; one warm-up
generation first, then the timed one. tokens/s = batch x new tokens / wall time of the generation (prefill
included); the prefill time is reported apart. Modes alternate; the table gives medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MODEL_CONFIG, load_average, machine, run_worker  # noqa: E402

MODES = {"torch_eager": "PyTorch eager (transformers generate)", "onnxruntime": "onnxruntime (exported graph)"}


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(batch)
    return [rng.integers(3, vocab, length).tolist() for _ in range(batch)]


def build_model(workdir: Path, vocab: int) -> None:
    """Random-weight model folder + its exported graph in workdir/model and workdir/onnx."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from component.export.onnx import export_decoder

    torch.manual_seed(0)
    config = AutoConfig.for_model(**MODEL_CONFIG, vocab_size=vocab, eos_token_id=None, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(workdir / "model")
    (workdir / "onnx").mkdir(exist_ok=True)
    export_decoder(model, workdir / "onnx" / "model.onnx")
    model.config.save_pretrained(workdir / "onnx")


def run_mode(mode: str, workdir: Path, options: argparse.Namespace) -> dict:
    """Seconds of the prefill and of the whole generation, per batch size, in this process."""
    results = {}
    if mode == "onnxruntime":
        import numpy as np

        from component.config.generation import resolve_settings
        from component.inference.onnx_engine import OnnxDecoder

        decoder = OnnxDecoder(workdir / "onnx", threads=options.threads or None)
        settings = resolve_settings("greedy", {"max_new_tokens": options.new_tokens})

        def prefill(batch):
            ids = np.array(batch, dtype=np.int64)
            mask = np.ones_like(ids)
            decoder.step(ids, mask, mask.cumsum(-1) - 1, decoder.empty_cache(len(batch)))

        def generate(batch):
            out = decoder.generate(batch, settings, options.new_tokens, 0, [], np.random.default_rng(0))
            assert out.shape == (len(batch), options.new_tokens)

    else:
        import torch
        from transformers import AutoModelForCausalLM

        if options.threads:
            torch.set_num_threads(options.threads)
        model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).eval()

        def prefill(batch):
            with torch.inference_mode():
                model(input_ids=torch.tensor(batch), use_cache=True)

        def generate(batch):
            with torch.inference_mode():
                ids = torch.tensor(batch)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=options.new_tokens,
                    min_new_tokens=options.new_tokens,
                    pad_token_id=0,
                )
            assert out.shape == (len(batch), ids.shape[1] + options.new_tokens)

    for size in options.batch_sizes:
        batch = prompts(size, options.prompt, options.vocab)
        generate(batch)  # warm-up: first-run allocations, onnxruntime's kernel choices
        started = time.perf_counter()
        prefill(batch)
        prefill_seconds = time.perf_counter() - started
        started = time.perf_counter()
        generate(batch)
        seconds = time.perf_counter() - started
        results[str(size)] = {"seconds": seconds, "prefill_seconds": prefill_seconds}
    results["torch_imported"] = "torch" in sys.modules
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=262, help="output vocabulary (262: the byte-level one)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="threads per run (0: each library's default)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model and graph here")
    parser.add_argument("--json", type=Path, default=None, help="also write every run and the table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if options.worker:
        print("RESULT " + json.dumps(run_mode(options.worker, options.workdir, options)), flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="onnx_latency_") as temporary:
        workdir = options.workdir or Path(temporary)
        if not (workdir / "onnx" / "model.onnx").is_file():
            print("exporting the model ...", flush=True)
            build_model(workdir, options.vocab)
        forwarded = [f"--{k.replace('_', '-')}" for k in ("prompt", "new_tokens", "vocab", "threads")]
        values = [options.prompt, options.new_tokens, options.vocab, options.threads]
        common = [item for flag, value in zip(forwarded, values) for item in (flag, str(value))]
        common += ["--batch-sizes", *map(str, options.batch_sizes), "--workdir", str(workdir)]
        runs: dict[str, list[dict]] = {mode: [] for mode in options.modes}
        print(f"load average before: {load_average()}", flush=True)
        for repeat in range(options.repeats):
            order = options.modes[repeat % len(options.modes) :] + options.modes[: repeat % len(options.modes)]
            for mode in order:
                run = run_worker([sys.executable, __file__, "--worker", mode, *common], mode)
                runs[mode].append(run)
                print(f"repeat {repeat + 1} {mode}: {json.dumps(run)}", flush=True)
        print(f"load average after: {load_average()}")

    rows = []
    for size in map(str, options.batch_sizes):
        medians = {
            mode: (
                statistics.median(run[size]["seconds"] for run in runs[mode]),
                statistics.median(run[size]["prefill_seconds"] for run in runs[mode]),
            )
            for mode in options.modes
        }
        base = int(size) * options.new_tokens / medians.get("torch_eager", next(iter(medians.values())))[0]
        for mode, (seconds, prefill) in medians.items():
            rate = int(size) * options.new_tokens / seconds
            rows.append((size, MODES[mode], rate, rate / base, prefill * 1000, seconds))
    print(
        f"\n{machine()}; prompt {options.prompt}, {options.new_tokens} new tokens, vocab {options.vocab}, "
        f"threads {options.threads or 'default'}, median of {options.repeats}\n"
    )
    print("| batch | mode | tokens/s | vs PyTorch | prefill ms | generation s |")
    print("|---:|---|---:|---:|---:|---:|")
    for size, label, rate, ratio, prefill_ms, seconds in rows:
        print(f"| {size} | {label} | {rate:.1f} | {ratio:.2f}x | {prefill_ms:.1f} | {seconds:.2f} |")
    if options.json:
        options.json.write_text(json.dumps({"runs": runs, "table": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
