"""SFT throughput: our batching modes against TRL's SFTTrainer, same model, data, examples and settings.

    python benchmarks/sft_throughput.py                       # every mode once, ~10 minutes on 2 CPU cores
    python benchmarks/sft_throughput.py --repeats 3 --json out.json
    python benchmarks/sft_throughput.py --modes ours_default trl_default
    python benchmarks/sft_throughput.py --attention-study      # why: forward+backward per batch layout
    python benchmarks/sft_throughput.py --data uniform         # another length spread
    python benchmarks/sft_throughput.py --whole-process --repeats 3   # `python train_sft.py` vs a TRL script

One tiny Llama-shaped model (hidden 256, 4 layers, 8 heads, byte-level tokenizer: a token per UTF-8 byte),
fp32, full fine-tuning, AdamW; a synthetic Firefly-layout file (`kind`/`input`/`target`) with a realistic
length spread (`--data longtail`: median ~300 tokens, long tail to ~1,900, cut at max length 1024; `--data
uniform`: lengths spread evenly from 40 to 1,024); batch 8, one epoch. Every
mode sees the same tokenized examples (our cached pipeline; TRL gets the same input_ids and labels) and the
same training settings; only the batching differs. TRL's `gradient_checkpointing` and `bf16` defaults are
turned off so that it trains like the others (fp32, no recomputation); everything else of TRL is its default.

Each mode runs in its own process (peak memory is per process), modes are interleaved across repeats so they
share the machine's conditions, and the table reports the median over repeats:
label tokens/s (label tokens trained on / wall time of `trainer.train()`), wall time, padding fraction (pad
positions / positions the model ran on), peak RSS of the process, optimizer steps, and the final loss: the
label-token-weighted loss of the trained model on 40 held-out records (the same for every mode).

`--whole-process` times whole processes instead, interleaved: `python train_sft.py --train_args_file ...` with
our defaults (only the model, data, full fine-tuning and the shared settings given) against benchmarks/trl_sft.py
(the same run written for TRL's SFTTrainer), each from a fresh data cache; the table adds each one's
`train_runtime` (its own metrics) and the rest (start-up, data, saving).

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
    DATASETS,
    MODEL_CONFIG,
    CountingCollator,
    interleaved_runs,
    load_average,
    machine,
    median_rows,
)

MODES = {
    "ours_default": "ours: default (packing: null)",
    "ours_mask": "ours: packed rows, row x row mask",
    "ours_padded": "ours: padded, random order",
    "ours_grouped": "ours: group_by_length",
    "ours_packing": "ours: packing",
    "trl_default": "TRL SFTTrainer: defaults (padded)",
    "trl_grouped": "TRL SFTTrainer: group_by_length",
    "trl_packing": "TRL SFTTrainer: packing=True",
}
OUR_KEYS = {
    "ours_default": {},
    "ours_mask": {"packed_attention": "mask"},  # the default before SDPA per sequence
    "ours_padded": {"packing": False, "group_by_length": False},
    "ours_grouped": {"group_by_length": True},
    "ours_packing": {"packing": True},
}


# --- data and model ------------------------------------------------------------------------------------------
WHOLE_PROCESS = {"ours_script": "ours: python train_sft.py, defaults", "trl_script": "TRL: benchmarks/trl_sft.py"}


def build_workdir(workdir: Path, records: int, held_out: int, data: str = "longtail") -> None:
    from component.demo_assets import build_tiny_model, build_tokenizer

    marker = workdir / "data.txt"  # which spread and size the files hold (the data cache keys on the files)
    if not marker.is_file() or marker.read_text() != f"{data} {records} {held_out}":
        workdir.mkdir(parents=True, exist_ok=True)
        rows = DATASETS[data](records + held_out)
        for name, part in (("train.jsonl", rows[:records]), ("eval.jsonl", rows[records:])):
            (workdir / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), "utf-8")
        marker.write_text(f"{data} {records} {held_out}")
    if (workdir / "model" / "config.json").is_file():
        return
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


# --- whole processes -----------------------------------------------------------------------------------------------
def run_whole_process(mode: str, workdir: Path, options: argparse.Namespace) -> dict:
    """One `python train_sft.py` or `python benchmarks/trl_sft.py` run, timed from launch to exit, fresh caches."""
    import shutil
    import subprocess

    run_dir = Path(tempfile.mkdtemp(prefix=mode, dir=workdir))
    env = {**os.environ, "HF_DATASETS_CACHE": str(run_dir / "hf_cache")}  # TRL's map cache: fresh too
    model, train = str(workdir / "model"), str(workdir / "train.jsonl")
    if mode == "ours_script":
        config = {
            "model_name_or_path": model,
            "train_file": train,
            "max_seq_length": options.max_length,
            "finetuning_type": "full",
            "per_device_train_batch_size": options.batch_size,
            "num_train_epochs": 1,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "constant",
            "seed": options.seed,
            "output_dir": str(run_dir / "out"),
            "data_cache_dir": str(run_dir / "cache"),
        }
        (run_dir / "train_args.json").write_text(json.dumps(config))
        command = [sys.executable, str(REPO / "train_sft.py"), "--train_args_file", str(run_dir / "train_args.json")]
    else:
        command = [sys.executable, str(REPO / "benchmarks" / "trl_sft.py"), model, train, str(run_dir / "out")]
        command += ["--max-length", str(options.max_length), "--batch-size", str(options.batch_size)]
        command += ["--seed", str(options.seed)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=run_dir, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    metrics = json.loads((run_dir / "out" / "train_results.json").read_text())
    shutil.rmtree(run_dir)
    return {
        "mode": mode,
        "wall_s": wall,
        "train_runtime_s": metrics["train_runtime"],
        "outside_training_s": wall - metrics["train_runtime"],
        "train_loss": metrics["train_loss"],
    }


def whole_process_table(rows: list[dict]) -> str:
    base = next((r["wall_s"] for r in rows if r["mode"] == "trl_script"), None)
    lines = [
        "| run | whole process s | TRL / ours | train_runtime s | outside training s | train loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{base / r['wall_s']:.2f}x" if base else "-"
        lines.append(
            f"| {WHOLE_PROCESS[r['mode']]} | {r['wall_s']:.1f} | {ratio} | {r['train_runtime_s']:.1f} | "
            f"{r['outside_training_s']:.1f} | {r['train_loss']:.3f} |"
        )
    return "\n".join(lines)


# --- why: the model's forward + backward under each batch layout ------------------------------------------------
def attention_study(workdir: Path, options: argparse.Namespace) -> str:
    """Forward + backward of the epoch's batches under each layout, interleaved batch by batch in one process.

    No optimizer, no Trainer: only what the model does with each layout. "attention work" is the sum over rows
    of the attended (query, key) pairs: a causal row without a mask counts L^2/2 (SDPA skips the upper
    triangle), a row with a mask L^2 (the whole square is computed, masked blocks included), a row attended per
    sequence (`sdpa_segments`) the sum of its sequences' L^2/2.
    """
    import torch

    from component.data.collators import PackingCollator, PaddingCollator
    from component.model.packed_attention import SEGMENT_ATTENTION, packed_lengths, register_segment_attention
    from component.train.host import training_host

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
    register_segment_attention()
    sdpa, segments = "sdpa", SEGMENT_ATTENTION
    layouts = {  # name -> (collator, batches, attention implementation)
        "padded, mask (TRL default)": (PaddingCollator(pad), random_batches, sdpa),
        "padded, no mask (ours, packing: false)": (PaddingCollator(pad, attention_mask=False), random_batches, sdpa),
        "sorted by length, no mask (ideal grouping)": (
            PaddingCollator(pad, attention_mask=False),
            sorted_batches,
            sdpa,
        ),
        "packed, one flat row per batch, mask": (PackingCollator(pad, None), random_batches, sdpa),
        f"packed, rows <= {options.max_length} tokens, mask": (
            PackingCollator(pad, options.max_length),
            random_batches,
            sdpa,
        ),
        "packed, rows <= longest example, mask (ours before)": (PackingCollator(pad, "longest"), random_batches, sdpa),
        "packed, one flat row per batch, SDPA per sequence (ours)": (
            PackingCollator(pad, None),
            random_batches,
            segments,
        ),
    }
    batches = {name: [collate(b) for b in bs] for name, (collate, bs, _) in layouts.items()}
    seconds = dict.fromkeys(layouts, 0.0)
    training_host()  # as in every recipe's train()
    for index in range(len(random_batches)):
        for name, (_, _, attention) in layouts.items():
            model.config._attn_implementation_internal = attention
            start = time.perf_counter()
            model(**batches[name][index]).loss.backward()
            seconds[name] += time.perf_counter() - start
            model.zero_grad(set_to_none=True)

    def work(batch, attention: str) -> int:
        if attention == segments:
            return sum(length * length // 2 for row in packed_lengths(batch["position_ids"]) for length in row)
        # transformers drops an all-ones mask (plain causal); packed rows always get the block-diagonal mask
        masked = "position_ids" in batch or ("attention_mask" in batch and not bool(batch["attention_mask"].all()))
        width = batch["input_ids"].shape[1]
        return int(batch["input_ids"].shape[0] * width * width / (1 if masked else 2))

    real = sum(len(r["input_ids"]) for r in rows)
    lines = [
        "| layout | seconds | positions | padding | attention work (M pairs) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (_, _, implementation) in layouts.items():
        positions = sum(b["input_ids"].numel() for b in batches[name])
        attention = sum(work(b, implementation) for b in batches[name]) / 1e6
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
    parser.add_argument("--data", choices=list(DATASETS), default="longtail", help="the records' length spread")
    parser.add_argument("--attention-study", action="store_true", help="only the per-layout forward+backward study")
    parser.add_argument("--whole-process", action="store_true", help="time python train_sft.py against a TRL script")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if options.worker:
        run = run_whole_process if options.worker in WHOLE_PROCESS else run_mode
        print("RESULT " + json.dumps(run(options.worker, options.workdir, options)), flush=True)
        return

    with tempfile.TemporaryDirectory() as scratch:
        workdir = options.workdir or Path(scratch)
        build_workdir(workdir, options.records, held_out=40, data=options.data)
        _, _, _, data = load_data(workdir, options)  # tokenize once; every run loads the cache
        if options.attention_study:
            print(f"machine: {machine()}; load average {load_average()}")
            print(attention_study(workdir, options))
            print(f"load average after: {load_average()}")
            return
        report = data.report["tokens"]
        modes = list(WHOLE_PROCESS) if options.whole_process else list(options.modes)
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
            lambda run: (
                f"{run['label_tokens_per_s']:.0f} label tokens/s, {run['wall_s']:.1f} s"
                if "label_tokens_per_s" in run
                else f"{run['wall_s']:.1f} s, train_runtime {run['train_runtime_s']:.1f} s"
            ),
        )
        print(f"load average after: {load_average()}")
        if options.whole_process:
            keys = ("wall_s", "train_runtime_s", "outside_training_s", "train_loss")
            rows = median_rows(runs, keys)
            print(whole_process_table(rows))
        else:
            rows = [median_row(runs[m]) for m in modes]
            print(table(rows))
        if options.json:
            options.json.write_text(
                json.dumps({"machine": machine(), "data": data.report["tokens"], "runs": runs, "table": rows}, indent=2)
            )


if __name__ == "__main__":
    main(sys.argv[1:])
