"""DPO throughput and memory: our train_dpo.py path against TRL's DPOTrainer, same model, pairs and settings.

    python benchmarks/dpo_throughput.py                      # every mode once
    python benchmarks/dpo_throughput.py --repeats 3 --json out.json
    python benchmarks/dpo_throughput.py --vocab 32000         # a real vocabulary's LM-head cost

The tiny Llama-shaped model of benchmarks/sft_throughput.py (hidden 256, 4 layers, byte-level tokenizer), fp32,
a new LoRA (r 16, every linear layer) whose reference is the base with the adapter switched off, sigmoid loss,
beta 0.1, AdamW, batch 8 pairs, one epoch. The pairs are synthetic Chinese/ASCII text with a realistic spread
(prompt median ~120 tokens, replies median ~200, cut at 1024). Every mode trains on the same rendered text:
ours reads it through our data path (human_assistant template); TRL gets the same prompt text, rendered, and the
same replies (it appends EOS as our template does). TRL runs with its defaults except `bf16` and
`gradient_checkpointing` off, so both train in fp32 without recomputation; ours runs with its defaults (chosen
and rejected packed padding-free, logits at label positions only).

Each mode runs in its own process (peak RSS is per process), modes are interleaved across repeats; the table
gives medians: pairs/s (pairs / wall time of `trainer.train()`), wall time, peak RSS, and the final training loss.
TRL is a benchmark-only dependency (`pip install trl`); without it its mode is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    build_byte_model,
    interleaved_runs,
    load_average,
    machine,
    median_rows,
    text_of_tokens,
)

MODES = {"ours_default": "ours: default (packed pairs)", "ours_padded": "ours: padded", "trl_default": "TRL DPOTrainer"}
LORA = {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0}


def pairs(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def length(median: int) -> int:
        return min(600, max(8, int(math.exp(rng.gauss(math.log(median), 0.6)))))

    return [
        {
            "prompt": text_of_tokens(rng, length(120)),
            "chosen": text_of_tokens(rng, length(200)),
            "rejected": text_of_tokens(rng, length(200)),
        }
        for _ in range(count)
    ]


def build_workdir(workdir: Path, count: int, vocab: int) -> None:
    """The pairs and the model (`build_byte_model`: `vocab` > 262 widens the output layer as a real vocabulary
    would)."""
    if (workdir / "model" / "config.json").is_file():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    rows = pairs(count)
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    build_byte_model(workdir / "model", vocab)


def our_args(workdir: Path, options: argparse.Namespace, **keys) -> dict:
    return {
        "model_name_or_path": str(workdir / "model"),
        "train_file": str(workdir / "pairs.jsonl"),
        "max_seq_length": 1024,
        "finetuning_type": "lora",
        **LORA,
        "loss_type": "sigmoid",
        "beta": 0.1,
        "data_cache_dir": str(workdir / "cache"),
        "output_dir": str(workdir / "out"),
        "per_device_train_batch_size": options.batch_size,
        "num_train_epochs": 1,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "dataloader_num_workers": 0,
        **keys,
    }


def our_trainer(mode: str, workdir: Path, options: argparse.Namespace):
    import train_dpo
    from component.config.training import DPOArguments, build_arguments
    from component.data.collators import PairCollator
    from component.data.pairwise import prepare_pair_data
    from component.data.template import get_template
    from component.model.loader import load_model, load_tokenizer
    from component.train.batching import packing_row_tokens, use_packing
    from component.train.dpo import DPOTrainer

    keys = {"packing": False} if mode == "ours_padded" else {}
    args, training_args = build_arguments(our_args(workdir, options, **keys), ours=DPOArguments)
    tokenizer = load_tokenizer(args.model_name_or_path)
    data = prepare_pair_data(args, get_template(args.template, tokenizer), training_args, with_labels=True)
    model = load_model(args, False)
    packing = use_packing(args, training_args, model)
    collator = PairCollator(tokenizer.pad_token_id, packing, packing_row_tokens(args, model), attention_mask=False)
    assert train_dpo  # the recipe these steps mirror
    return DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        data_collator=collator,
        processing_class=tokenizer,
        reference="adapter_off",
    ), len(data.train)


def trl_trainer(workdir: Path, options: argparse.Namespace):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from component.data.template import get_template
    from component.model.loader import load_tokenizer

    tokenizer = load_tokenizer(str(workdir / "model"))
    template = get_template("human_assistant", tokenizer)
    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text("utf-8").splitlines()]
    rendered = [  # the prompt exactly as our template renders it (its BOS comes from TRL's own tokenization)
        tokenizer.decode(template.encode_prompt([], r["prompt"]), skip_special_tokens=True) for r in rows
    ]
    dataset = Dataset.from_dict(
        {"prompt": rendered, "chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]}
    )
    config = DPOConfig(
        output_dir=str(workdir / "trl_out"),
        beta=0.1,
        max_length=1024,
        per_device_train_batch_size=options.batch_size,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
    )
    peft_config = LoraConfig(
        r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, target_modules="all-linear"
    )
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    return trainer, len(dataset)


def run_mode(mode: str, workdir: Path, options: argparse.Namespace) -> dict:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    trainer, count = trl_trainer(workdir, options) if mode == "trl_default" else our_trainer(mode, workdir, options)
    started, cpu = time.perf_counter(), time.process_time()
    result = trainer.train()
    wall = time.perf_counter() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "mode": mode,
        "pairs": count,
        "pairs_per_s": count / wall,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": result.global_step,
        "final_loss": statistics.mean(losses[-5:]),
    }


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["mode"] == "trl_default"), None)
    lines = [
        "| mode | pairs/s | vs TRL | wall s | peak RSS MiB | vs TRL | steps | loss (last 5 steps) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else "-"
        memory = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else "-"
        lines.append(
            f"| {MODES[r['mode']]} | {r['pairs_per_s']:.2f} | {speed} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} "
            f"| {memory} | {r['steps']} | {r['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=262, help="output vocabulary (262 = the byte tokenizer's own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if options.worker:
        print("RESULT " + json.dumps(run_mode(options.worker, options.workdir, options)), flush=True)
        return
    with tempfile.TemporaryDirectory() as scratch:
        workdir = options.workdir or Path(scratch)
        build_workdir(workdir, options.pairs, options.vocab)
        modes = list(options.modes)
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed: skipping its mode", file=sys.stderr)
            modes = [m for m in modes if m != "trl_default"]
        print(f"machine: {machine()}\nload average before: {load_average()}", flush=True)
        forwarded = ["--batch-size", str(options.batch_size), "--threads", str(options.threads)]
        runs = interleaved_runs(
            modes,
            options.repeats,
            lambda mode: [sys.executable, __file__, "--worker", mode, "--workdir", str(workdir), *forwarded],
            lambda run: f"{run['pairs_per_s']:.2f} pairs/s, {run['peak_rss_mib']:.0f} MiB",
        )
        rows = median_rows(runs, ("pairs_per_s", "wall_s", "cpu_s", "peak_rss_mib", "final_loss"))
        print(f"load average after: {load_average()}")
        print(table(rows))
        if options.json:
            options.json.write_text(json.dumps({"machine": machine(), "runs": runs, "table": rows}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
