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

MODES = {"torch_eager": "PyTorch eager (transformers generate)", "onnxruntime": "onnxruntime (exported graph)"}


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
    """Per batch size, in this process: seconds of the prefill and of the whole generation, and the tokens."""
    batches = {str(size): random_prompts(size, options.prompt, options.vocab) for size in options.batch_sizes}
    if mode == "onnxruntime":
        import numpy as np

        from component.inference.onnx_engine import OnnxDecoder

        decoder = OnnxDecoder(workdir / "onnx", threads=options.threads or None)

        def prefill(batch):
            ids = np.array(batch, dtype=np.int64)
            mask = np.ones_like(ids)
            decoder.step(ids, mask, mask.cumsum(-1) - 1, decoder.empty_cache(len(batch)))

        results = timed_generations(prefill, lambda batch: onnx_greedy(decoder, batch, options.new_tokens), batches)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        if options.threads:
            torch.set_num_threads(options.threads)
        model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).eval()

        def prefill(batch):
            with torch.inference_mode():
                model(input_ids=torch.tensor(batch), use_cache=True)

        results = timed_generations(prefill, lambda batch: torch_greedy(model, batch, options.new_tokens), batches)
    return {**results, "torch_imported": "torch" in sys.modules}


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
        settings = f"prompt {options.prompt}, {options.new_tokens} new tokens, vocab {options.vocab}"
        compare_speeds(
            options.modes,
            options.repeats,
            lambda mode: [sys.executable, __file__, "--worker", mode, *common],
            MODES,
            options.new_tokens,
            f"{settings}, threads {options.threads or 'default'}",
            options.json,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
