"""SFT memory and speed against the output vocabulary: our LM-head paths vs TRL's SFTTrainer, LoRA.

    python benchmarks/sft_memory.py --vocab 262 32000 64000 125696 151936 --records 120 --repeats 2
    python benchmarks/sft_memory.py --vocab 125696 --modes ours_default trl_default
    python benchmarks/sft_memory.py --baseline /tmp/main --modes ours_default baseline   # against another checkout

The sft_throughput.py setup (tiny Llama, hidden 256, 4 layers; byte-level tokenizer; synthetic Firefly
records, median ~300 tokens, cut at 1,024; batch 8; one epoch; fp32, no gradient checkpointing) with LoRA
(r 64, alpha 16, dropout 0.05, every linear layer but the head, for every mode) and a model whose output
vocabulary is `--vocab` (the tokenizer's 262 ids are its first rows; the rest are never a target but every
logit row is computed, as with a real large vocabulary). `--train-file` trains on a Firefly-layout JSONL of
yours instead of the synthetic records. Modes:

- ours_default: train_sft.py's defaults (packing: null, `logits_path: "chunked"`, `logits_chunk_mib: 256`);
- ours_rows: the same with `logits_chunk_mib: null` (1,024 label positions per head chunk at every vocabulary);
- ours_model: the same with `logits_path: "model"` (the model's own forward + loss: today's path before
  train.lm_head);
- trl_default: TRL `SFTTrainer` defaults with the same LoRA config (`peft_config`), fp32, no gradient
  checkpointing, on the same tokenized input_ids and labels;
- baseline: ours_default run with the `component` package of the checkout at `--baseline` (e.g. today's main:
  `git archive main | tar -x -C /tmp/main`), to compare a change with the code before it.

Each run is its own process (peak RSS = that process's VmHWM, whole process: weights, data, Python; its
`ru_maxrss` would include the launching process's peak, which Linux carries across exec), runs are interleaved
(vocabularies in turn, modes rotating each repeat), and the table gives medians; "MiB per 32k" is the growth of
the peak from the smallest vocabulary of the run, per 32,000 rows of vocabulary. TRL is benchmark-only:
`pip install trl --no-deps`; without it its mode is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    MODEL_CONFIG,
    CountingCollator,
    current_rss_kib,
    firefly_records,
    load_average,
    machine,
    peak_rss_mib,
    run_worker,
)

MODES = {
    "ours_default": 'ours: default (logits_path: "chunked", logits_chunk_mib: 256)',
    "ours_rows": "ours: logits_chunk_mib: null (1,024 rows per chunk)",
    "ours_model": 'ours: logits_path: "model"',
    "trl_default": "TRL SFTTrainer: defaults, LoRA",
    "baseline": "ours: default, --baseline checkout",
}
LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.05}


def build_workdir(workdir: Path, records: int, vocabs: list[int], train_file: Path | None = None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from component.demo_assets import build_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    if train_file is not None:
        (workdir / "train.jsonl").write_bytes(train_file.read_bytes())
    elif not (workdir / "train.jsonl").is_file():
        rows = firefly_records(records)
        (workdir / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    tokenizer = build_tokenizer(corpus=["x"], vocab_size=262)  # the 256 bytes and 6 special tokens
    for vocab in vocabs:
        folder = workdir / f"model_{vocab}"
        if (folder / "config.json").is_file():
            continue
        config = {k: v for k, v in MODEL_CONFIG.items() if k != "model_type"}
        config.update(
            vocab_size=max(vocab, len(tokenizer)),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(MODEL_CONFIG["model_type"], **config))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def load_data(workdir: Path, vocab: int, options: argparse.Namespace, **ours):
    from component.config.training import build_arguments
    from component.data.supervised import prepare_sft_data
    from component.data.template import get_template
    from component.model.loader import load_tokenizer

    raw = {
        "model_name_or_path": str(workdir / f"model_{vocab}"),
        "train_file": str(workdir / "train.jsonl"),
        "max_seq_length": options.max_length,
        "finetuning_type": "lora",
        "lora_rank": LORA["r"],
        "lora_alpha": LORA["lora_alpha"],
        "lora_dropout": LORA["lora_dropout"],
        "data_cache_dir": str(workdir / "cache"),
        "output_dir": str(workdir / "out"),
        "per_device_train_batch_size": options.batch_size,
        "num_train_epochs": 1,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        **ours,
    }
    args, training_args = build_arguments(raw)
    tokenizer = load_tokenizer(args.model_name_or_path)
    data = prepare_sft_data(args, get_template(args.template, tokenizer), training_args)
    return args, training_args, tokenizer, data


def our_trainer(mode: str, workdir: Path, vocab: int, options: argparse.Namespace):
    from component.model.loader import load_model
    from component.train.batching import make_collator, use_packing
    from component.train.sft import SFTTrainer

    path = "model" if mode == "ours_model" else "chunked"
    settings = {"logits_path": path, **({"logits_chunk_mib": None} if mode == "ours_rows" else {})}
    args, training_args, tokenizer, data = load_data(workdir, vocab, options, **settings)
    model = load_model(args, gradient_checkpointing=False)
    packing = use_packing(args, training_args, model)
    collator = make_collator(args, training_args, tokenizer, packing, model)
    chunking = {"logits_chunk_size": args.logits_chunk_size}
    if hasattr(args, "logits_chunk_mib"):  # not in a --baseline checkout from before the key
        chunking["logits_chunk_mib"] = args.logits_chunk_mib
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        data_collator=collator,
        logits_path=args.logits_path,
        **chunking,
    )
    return trainer, f"{'packed' if packing else 'padded'}, logits_path {path}, {chunking}"


def trl_trainer(workdir: Path, vocab: int, options: argparse.Namespace):
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    args, training_args, tokenizer, data = load_data(workdir, vocab, options)
    config = trl.SFTConfig(
        output_dir=str(workdir / "out_trl"),
        per_device_train_batch_size=options.batch_size,
        num_train_epochs=1,
        learning_rate=training_args.learning_rate,
        lr_scheduler_type=training_args.lr_scheduler_type,
        logging_steps=training_args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=0,
        max_length=options.max_length,
        gradient_checkpointing=False,  # like our modes: no recomputation
        bf16=False,  # fp32 like our modes on the CPU
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    peft_config = LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM", bias="none")
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=data.train.select_columns(["input_ids", "labels"]),  # the same tokens and labels as ours
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return trainer, f"trl {trl.__version__}, padded"


def run_mode(mode: str, vocab: int, workdir: Path, options: argparse.Namespace) -> dict:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    if mode.startswith("ours") or mode == "baseline":
        trainer, note = our_trainer(mode, workdir, vocab, options)
    else:
        trainer, note = trl_trainer(workdir, vocab, options)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    before = current_rss_kib()
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    return {
        "mode": mode,
        "vocab": vocab,
        "note": note,
        "label_tokens": counter.label_tokens,
        "label_tokens_per_s": counter.label_tokens / wall,
        "wall_s": wall,
        "peak_rss_mib": peak_rss_mib(),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_train_mib": before / 1024,
        "steps": result.global_step,
        "train_loss": result.training_loss,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| vocab | mode | label tokens/s | vs TRL | peak RSS MiB | vs TRL | MiB per 32k | RSS before train MiB "
        "| wall s | steps | train loss |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        trl = next((t for t in rows if t["vocab"] == r["vocab"] and t["mode"] == "trl_default"), None)
        speed = f"{r['label_tokens_per_s'] / trl['label_tokens_per_s']:.2f}x" if trl else "-"
        memory = f"{r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x" if trl else "-"
        smallest = min((t for t in rows if t["mode"] == r["mode"]), key=lambda t: t["vocab"])
        growth = (r["peak_rss_mib"] - smallest["peak_rss_mib"]) * 32000 / (r["vocab"] - smallest["vocab"] or 1)
        lines.append(
            f"| {r['vocab']:,} | {MODES[r['mode']]} | {r['label_tokens_per_s']:.0f} | {speed} | "
            f"{r['peak_rss_mib']:.0f} | {memory} | {growth if r is not smallest else 0:.0f} | "
            f"{r['rss_before_train_mib']:.0f} | {r['wall_s']:.1f} | {r['steps']} | {r['train_loss']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[262, 32000, 64000, 125696, 151936])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["ours_default", "trl_default"])
    parser.add_argument("--records", type=int, default=120)
    parser.add_argument("--train-file", type=Path, default=None, help="a Firefly-layout JSONL instead of --records")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout whose component/ the baseline runs")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models, data and cache here")
    parser.add_argument("--json", type=Path, default=None, help="also write every run and the table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-vocab", type=int, default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if "baseline" in options.modes and options.baseline is None:
        parser.error("the baseline mode needs --baseline DIR")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if options.worker:
        if options.worker == "baseline":
            sys.path.insert(0, str(options.baseline))  # its component/ before ours
        result = run_mode(options.worker, options.worker_vocab, options.workdir, options)
        print("RESULT " + json.dumps(result), flush=True)
        return

    with tempfile.TemporaryDirectory() as scratch:
        workdir = options.workdir or Path(scratch)
        build_workdir(workdir, options.records, options.vocab, options.train_file)
        _, _, _, data = load_data(workdir, options.vocab[0], options)  # tokenize once; every run loads the cache
        modes = list(options.modes)
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed: skipping its mode (pip install trl --no-deps)", file=sys.stderr)
            modes = [m for m in modes if not m.startswith("trl")]
        print(f"machine: {machine()}")
        print(
            f"data: {len(data.train)} records, tokens {data.report['tokens']}, label tokens {data.report['label_tokens']}"
        )
        print(f"load average before: {load_average()}", flush=True)
        runs: dict[tuple[int, str], list[dict]] = {(v, m): [] for v in options.vocab for m in modes}
        for repeat in range(options.repeats):
            order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]  # interleave: rotate the order
            for vocab in options.vocab:
                for mode in order:
                    command = [sys.executable, __file__, "--worker", mode, "--worker-vocab", str(vocab)]
                    command += ["--workdir", str(workdir), "--max-length", str(options.max_length)]
                    command += ["--batch-size", str(options.batch_size), "--threads", str(options.threads)]
                    if mode == "baseline":
                        command += ["--baseline", str(options.baseline)]
                    run = run_worker(command, f"{mode} {vocab}")
                    runs[(vocab, mode)].append(run)
                    print(f"  [{repeat + 1}/{options.repeats}] vocab {vocab} {mode}: "
                          f"{run['label_tokens_per_s']:.0f} label tokens/s, peak {run['peak_rss_mib']:.0f} MiB, "
                          f"{run['wall_s']:.1f} s (load {load_average()})", flush=True)  # fmt: skip
        rows = []
        for (_, _), group in runs.items():
            row = dict(group[0])
            for key in (
                "label_tokens_per_s",
                "wall_s",
                "peak_rss_mib",
                "ru_maxrss_mib",
                "rss_before_train_mib",
                "train_loss",
            ):
                row[key] = statistics.median(r[key] for r in group)
            row["runs"] = len(group)
            rows.append(row)
        print(f"load average after: {load_average()}")
        print(table(rows))
        if options.json:
            options.json.write_text(json.dumps({"machine": machine(), "runs": list(runs.values()), "table": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
