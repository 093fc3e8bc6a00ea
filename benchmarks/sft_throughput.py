"""SFT throughput: our batching modes against TRL's SFTTrainer, same model, data, examples and settings.

    python benchmarks/sft_throughput.py                       # every mode once, ~10 minutes on 2 CPU cores
    python benchmarks/sft_throughput.py --repeats 3 --json out.json
    python benchmarks/sft_throughput.py --modes ours_default trl_default
    python benchmarks/sft_throughput.py --attention-study      # why: forward+backward per batch layout

One tiny Llama-shaped model (hidden 256, 4 layers, 8 heads, byte-level tokenizer: a token per UTF-8 byte),
fp32, full fine-tuning, AdamW; a synthetic Firefly-layout file (`kind`/`input`/`target`) with a realistic
length spread (median ~300 tokens, long tail to ~1,900, cut at max length 1024); batch 8, one epoch. Every
mode sees the same tokenized examples (our cached pipeline; TRL gets the same input_ids and labels) and the
same training settings; only the batching differs. TRL's `gradient_checkpointing` and `bf16` defaults are
turned off so that it trains like the others (fp32, no recomputation); everything else of TRL is its default.

Each mode runs in its own process (peak memory is per process), modes are interleaved across repeats so they
share the machine's conditions, and the table reports the median over repeats:
label tokens/s (label tokens trained on / wall time of `trainer.train()`), wall time, padding fraction (pad
positions / positions the model ran on), peak RSS of the process, optimizer steps, and the final loss: the
label-token-weighted loss of the trained model on 40 held-out records (the same for every mode).

TRL is an optional, benchmark-only dependency (`pip install trl --no-deps`); without it its modes are skipped.
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
    firefly_records,
    interleaved_runs,
    load_average,
    machine,
)

MODES = {
    "ours_default": "ours: default (packing: null)",
    "ours_padded": "ours: padded, random order",
    "ours_grouped": "ours: group_by_length",
    "ours_packing": "ours: packing",
    "trl_default": "TRL SFTTrainer: defaults (padded)",
    "trl_grouped": "TRL SFTTrainer: group_by_length",
    "trl_packing": "TRL SFTTrainer: packing=True",
}
OUR_KEYS = {
    "ours_default": {},
    "ours_padded": {"packing": False, "group_by_length": False},
    "ours_grouped": {"group_by_length": True},
    "ours_packing": {"packing": True},
}


# --- data and model ------------------------------------------------------------------------------------------
def build_workdir(workdir: Path, records: int, held_out: int) -> None:
    from component.demo_assets import build_tiny_model, build_tokenizer

    if (workdir / "model" / "config.json").is_file():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    rows = firefly_records(records + held_out)
    for name, part in (("train.jsonl", rows[:records]), ("eval.jsonl", rows[records:])):
        (workdir / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), "utf-8")
    tokenizer = build_tokenizer(corpus=["x"], vocab_size=262)  # no merges: the 256 bytes and 6 special tokens
    build_tiny_model(workdir / "model", config=MODEL_CONFIG, seed=0, tokenizer=tokenizer)


def train_args(workdir: Path, options: argparse.Namespace, **ours) -> dict:
    return {
        "model_name_or_path": str(workdir / "model"),
        "train_file": str(workdir / "train.jsonl"),
        "eval_file": str(workdir / "eval.jsonl"),
        "max_seq_length": options.max_length,
        "finetuning_type": "full",
        "data_cache_dir": str(workdir / "cache"),
        "output_dir": str(workdir / "out"),
        "per_device_train_batch_size": options.batch_size,
        "num_train_epochs": 1,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "seed": options.seed,
        **ours,
    }


def load_data(workdir: Path, options: argparse.Namespace, **ours):
    from component.config.training import build_arguments
    from component.data.supervised import prepare_sft_data
    from component.data.template import get_template
    from component.model.loader import load_tokenizer

    args, training_args = build_arguments(train_args(workdir, options, **ours))
    tokenizer = load_tokenizer(args.model_name_or_path)
    data = prepare_sft_data(args, get_template(args.template, tokenizer), training_args)
    return args, training_args, tokenizer, data


# --- one mode, in its own process ------------------------------------------------------------------------------
def heldout_loss(model, dataset, pad_token_id: int) -> float:
    import torch

    from component.data.collators import PaddingCollator

    model.eval()
    collate, total, count = PaddingCollator(pad_token_id), 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), 8):
            batch = collate([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def run_mode(mode: str, workdir: Path, options: argparse.Namespace) -> dict:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    if mode.startswith("ours"):
        trainer, note = our_trainer(mode, workdir, options)
    else:
        trainer, note = trl_trainer(mode, workdir, options)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    _, _, tokenizer, data = load_data(workdir, options)
    real_tokens = int(sum(data.train["length"]))
    return {
        "mode": mode,
        "note": note,
        "label_tokens": counter.label_tokens,
        "label_tokens_per_s": counter.label_tokens / wall,
        "wall_s": wall,
        "padding_fraction": 1 - real_tokens / counter.positions,
        "positions": counter.positions,
        "cpu_s": cpu,
        "label_tokens_per_cpu_s": counter.label_tokens / cpu,
        "peak_rss_mib": after.ru_maxrss / 1024,
        "train_rss_growth_mib": max(0, after.ru_maxrss - usage.ru_maxrss) / 1024,
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "final_loss": heldout_loss(trainer.model, data.eval, tokenizer.pad_token_id),
    }


def our_trainer(mode: str, workdir: Path, options: argparse.Namespace):
    from component.model.loader import load_model
    from component.train.batching import make_collator, resolve_batching, use_packing
    from component.train.sft import SFTTrainer

    args, training_args, tokenizer, data = load_data(workdir, options, **OUR_KEYS[mode])
    model = load_model(args, gradient_checkpointing=False)
    batching = resolve_batching(args, training_args, model)
    packing = use_packing(args, training_args, model)
    note = "packed" if packing else "padded, length-grouped" if batching.group_by_length else "padded"
    collator = make_collator(args, training_args, tokenizer, packing, model)
    if packing:
        rows = collator.row_tokens
        shapes = {None: "one flat row per batch", "longest": "rows of at most the batch's longest example"}
        note += ", " + shapes.get(rows, f"rows of at most {rows} tokens")
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        data_collator=collator,
        logits_path=args.logits_path,  # as train_sft.py: the chunked LM head by default
        logits_chunk_size=args.logits_chunk_size,
    )
    return trainer, note


def trl_trainer(mode: str, workdir: Path, options: argparse.Namespace):
    import torch
    import trl
    from transformers import AutoModelForCausalLM

    args, training_args, tokenizer, data = load_data(workdir, options)
    config = trl.SFTConfig(
        output_dir=str(workdir / "out_trl"),
        per_device_train_batch_size=options.batch_size,
        num_train_epochs=1,
        learning_rate=training_args.learning_rate,
        lr_scheduler_type=training_args.lr_scheduler_type,
        logging_steps=training_args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=options.seed,
        max_length=options.max_length,
        packing=mode == "trl_packing",
        train_sampling_strategy="group_by_length" if mode == "trl_grouped" else "random",
        gradient_checkpointing=False,  # like every other mode: no recomputation
        bf16=False,  # fp32 like every other mode
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=data.train.select_columns(["input_ids", "labels"]),  # the same tokens and labels as ours
        processing_class=tokenizer,
    )
    note = f"trl {trl.__version__}" + (", bfd packing into rows of max_length, padding-free" if config.packing else "")
    return trainer, note


# --- why: the model's forward + backward under each batch layout ------------------------------------------------
def attention_study(workdir: Path, options: argparse.Namespace) -> str:
    """Forward + backward of the epoch's batches under each layout, interleaved batch by batch in one process.

    No optimizer, no Trainer: only what the model does with each layout. "attention work" is the sum over rows
    of the attended (query, key) pairs: a causal row without a mask counts L^2/2 (SDPA skips the upper
    triangle), a row with a mask L^2 (the whole square is computed, masked blocks included).
    """
    import torch

    from component.data.collators import PackingCollator, PaddingCollator

    if options.threads:
        torch.set_num_threads(options.threads)
    args, _, tokenizer, data = load_data(workdir, options)
    from component.model.loader import load_model

    model = load_model(args, gradient_checkpointing=False)
    model.train()
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.train]
    generator = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(len(rows), generator=generator).tolist()
    by_length = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    size = options.batch_size
    random_batches = [[rows[i] for i in order[j : j + size]] for j in range(0, len(rows), size)]
    sorted_batches = [[rows[i] for i in by_length[j : j + size]] for j in range(0, len(rows), size)]
    pad = tokenizer.pad_token_id
    layouts = {
        "padded, mask (TRL default)": (PaddingCollator(pad), random_batches),
        "padded, no mask (ours, packing: false)": (PaddingCollator(pad, attention_mask=False), random_batches),
        "sorted by length, no mask (ideal grouping)": (PaddingCollator(pad, attention_mask=False), sorted_batches),
        "packed, one flat row per batch": (PackingCollator(pad, None), random_batches),
        f"packed, rows <= {options.max_length} tokens": (PackingCollator(pad, options.max_length), random_batches),
        "packed, rows <= longest example (ours)": (PackingCollator(pad, "longest"), random_batches),
    }
    batches = {name: [collate(b) for b in bs] for name, (collate, bs) in layouts.items()}
    seconds = dict.fromkeys(layouts, 0.0)
    for index in range(len(random_batches)):
        for name in layouts:
            start = time.perf_counter()
            model(**batches[name][index]).loss.backward()
            seconds[name] += time.perf_counter() - start
            model.zero_grad(set_to_none=True)

    def work(batch) -> int:
        # transformers drops an all-ones mask (plain causal); packed rows always get the block-diagonal mask
        masked = "position_ids" in batch or ("attention_mask" in batch and not bool(batch["attention_mask"].all()))
        width = batch["input_ids"].shape[1]
        return int(batch["input_ids"].shape[0] * width * width / (1 if masked else 2))

    real = sum(len(r["input_ids"]) for r in rows)
    lines = [
        "| layout | seconds | positions | padding | attention work (M pairs) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in layouts:
        positions = sum(b["input_ids"].numel() for b in batches[name])
        attention = sum(work(b) for b in batches[name]) / 1e6
        lines.append(
            f"| {name} | {seconds[name]:.1f} | {positions} | {100 * (1 - real / positions):.0f}% | {attention:.0f} |"
        )
    return "\n".join(lines)


# --- the parent: prepare, run every mode interleaved, print the table ------------------------------------------
def median_row(runs: list[dict]) -> dict:
    row = dict(runs[0])
    keys = ("label_tokens_per_s", "wall_s", "cpu_s", "label_tokens_per_cpu_s", "peak_rss_mib", "train_rss_growth_mib")
    for key in (*keys, "final_loss", "train_loss"):
        row[key] = statistics.median(r[key] for r in runs)
    row["runs"] = len(runs)
    return row


def table(rows: list[dict]) -> str:
    base = next((r["label_tokens_per_s"] for r in rows if r["mode"] == "trl_default"), None)
    lines = [
        "| mode | label tokens/s | vs TRL default | wall s | label tokens/CPU-s | padding | peak RSS MiB | steps "
        "| final loss | batches |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['label_tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"| {MODES[r['mode']]} | {r['label_tokens_per_s']:.0f} | {ratio} | {r['wall_s']:.1f} | "
            f"{r['label_tokens_per_cpu_s']:.0f} | "
            f"{100 * r['padding_fraction']:.0f}% | {r['peak_rss_mib']:.0f} | {r['steps']} | {r['final_loss']:.3f} | "
            f"{r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="training seed: initial order of the examples")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep model, data and cache here")
    parser.add_argument("--json", type=Path, default=None, help="also write every run and the table here")
    parser.add_argument("--attention-study", action="store_true", help="only the per-layout forward+backward study")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if options.worker:
        print("RESULT " + json.dumps(run_mode(options.worker, options.workdir, options)), flush=True)
        return

    with tempfile.TemporaryDirectory() as scratch:
        workdir = options.workdir or Path(scratch)
        build_workdir(workdir, options.records, held_out=40)
        _, _, _, data = load_data(workdir, options)  # tokenize once; every run loads the cache
        if options.attention_study:
            print(f"machine: {machine()}; load average {load_average()}")
            print(attention_study(workdir, options))
            print(f"load average after: {load_average()}")
            return
        report = data.report["tokens"]
        modes = list(options.modes)
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed: skipping the TRL modes (pip install trl --no-deps)", file=sys.stderr)
            modes = [m for m in modes if not m.startswith("trl")]
        print(f"machine: {machine()}")
        print(f"data: {len(data.train)} train records, tokens {report}, label tokens {data.report['label_tokens']}")
        print(f"load average before: {load_average()}", flush=True)
        common = ["--max-length", str(options.max_length), "--batch-size", str(options.batch_size)]
        common += ["--threads", str(options.threads), "--seed", str(options.seed)]
        runs = interleaved_runs(
            modes,
            options.repeats,
            lambda mode: [sys.executable, __file__, "--worker", mode, "--workdir", str(workdir), *common],
            lambda run: f"{run['label_tokens_per_s']:.0f} label tokens/s, {run['wall_s']:.1f} s",
        )
        rows = [median_row(runs[m]) for m in modes]
        print(f"load average after: {load_average()}")
        print(table(rows))
        if options.json:
            options.json.write_text(
                json.dumps({"machine": machine(), "data": data.report["tokens"], "runs": runs, "table": rows}, indent=2)
            )


if __name__ == "__main__":
    main(sys.argv[1:])
