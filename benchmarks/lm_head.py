"""The LM head + loss alone: seconds per forward + backward and peak memory against the vocabulary, for row chunks
sized by a MiB budget (ours), fixed row chunks, and vocabulary tiles with an online log-sum-exp (TRL's).

    python benchmarks/lm_head.py --vocab 32000 125696 151936 --repeats 3
    python benchmarks/lm_head.py --baseline /tmp/main --modes baseline ours:256      # against another checkout

One step: `causal_lm_loss` of `--rows` label positions (hidden 256, fp32, the head frozen and the hidden states
trainable, as under LoRA) and its backward to the hidden states. Modes:

- ours:MIB: `ChunkSize(1024, MIB)`, train_sft.py's path (default `logits_chunk_mib`: 256);
- rows:N: `ChunkSize(N, None)`, N rows per chunk whatever the vocabulary;
- trl:T: TRL 1.16's `ChunkedLogProbFunction` (trl/kernels/chunked_logprob.py: tiles of 4,096 positions x T
  vocabulary columns, two passes, the backward recomputing each tile; its torch fallback on a CPU), loss = the
  mean of -log p(target);
- baseline: `causal_lm_loss` of the checkout at `--baseline` (e.g. `git archive main | tar -x -C /tmp/main`),
  its default chunking.

Each mode and vocabulary runs in its own process: a warm-up step, then `--steps` timed steps (the median); memory
is the peak RSS above the RSS before the first step (the process's VmHWM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 256


def run_mode(mode: str, vocab: int, options: argparse.Namespace) -> dict:
    if mode == "baseline":
        sys.path.insert(0, str(options.baseline))  # its component/ comes first
    else:
        sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.common import current_rss_kib, peak_rss_mib

    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, vocab, bias=False).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=0.02)
    hidden = torch.randn(1, options.rows + 1, HIDDEN, requires_grad=True)
    labels = torch.randint(0, vocab, (1, options.rows + 1))
    labels[0, 0] = -100
    kind, _, value = mode.partition(":")
    if kind == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def loss_of() -> torch.Tensor:
            logprobs = ChunkedLogProbFunction.apply(
                hidden[0, :-1], head.weight, None, labels[0, 1:], 1.0, int(value), None, 1.0, ()
            )[0]
            return -logprobs.mean()
    else:
        from component.train import lm_head

        if kind == "baseline":
            chunk = lm_head.DEFAULT_CHUNK_SIZE
        else:
            chunk = lm_head.ChunkSize(1024, float(value)) if kind == "ours" else lm_head.ChunkSize(int(value), None)
        output_head = lm_head.OutputHead(head)

        def loss_of() -> torch.Tensor:
            return lm_head.causal_lm_loss(hidden, labels, output_head, None, chunk)

    def step() -> float:
        hidden.grad = None
        start = time.perf_counter()
        loss = loss_of()
        loss.backward()
        return time.perf_counter() - start, float(loss)

    before = current_rss_kib() / 1024
    _, loss = step()
    seconds = [step()[0] for _ in range(options.steps)]
    return {
        "mode": mode,
        "vocab": vocab,
        "seconds": statistics.median(seconds),
        "peak_above_mib": peak_rss_mib() - before,
        "loss": loss,
        "grad_abs_sum": float(hidden.grad.abs().sum()),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 64000, 125696, 151936])
    parser.add_argument("--modes", nargs="+", default=["rows:1024", "ours:128", "ours:256", "trl:32768"])
    parser.add_argument("--rows", type=int, default=2048, help="label positions per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout whose lm_head the baseline mode runs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-vocab", type=int, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        print("RESULT " + json.dumps(run_mode(options.worker, options.worker_vocab, options)), flush=True)
        return

    sys.path.insert(0, str(REPO))
    from benchmarks.common import load_average, machine, run_worker

    if "baseline" in options.modes and options.baseline is None:
        parser.error("the baseline mode needs --baseline DIR")
    print(f"machine: {machine()}")
    print(f"load average before: {load_average()}", flush=True)
    runs: dict[tuple[int, str], list[dict]] = {(v, m): [] for v in options.vocab for m in options.modes}
    modes = options.modes
    for repeat in range(options.repeats):
        order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]  # interleave: rotate the order
        for vocab in options.vocab:
            for mode in order:
                command = [sys.executable, __file__, "--worker", mode, "--worker-vocab", str(vocab)]
                command += ["--rows", str(options.rows), "--steps", str(options.steps)]
                command += ["--threads", str(options.threads)]
                if options.baseline:
                    command += ["--baseline", str(options.baseline)]
                run = run_worker(command, f"{mode} {vocab}")
                runs[(vocab, mode)].append(run)
                print(f"  [{repeat + 1}/{options.repeats}] vocab {vocab} {mode}: {run['seconds']:.2f} s, "
                      f"+{run['peak_above_mib']:.0f} MiB (load {load_average()})", flush=True)  # fmt: skip
    print(f"load average after: {load_average()}")
    print("| vocab | mode | s per step | peak above setup MiB | loss |")
    print("|---:|---|---:|---:|---:|")
    rows = []
    for (vocab, mode), group in runs.items():
        row = {**group[0], **{k: statistics.median(r[k] for r in group) for k in ("seconds", "peak_above_mib")}}
        rows.append(row)
        print(f"| {vocab:,} | {mode} | {row['seconds']:.2f} | {row['peak_above_mib']:.0f} | {row['loss']:.4f} |")
    if options.json:
        options.json.write_text(json.dumps({"machine": machine(), "runs": list(runs.values()), "table": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
