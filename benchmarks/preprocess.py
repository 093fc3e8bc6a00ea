"""Preprocessing speed: records/s of our cached SFT pipeline on a synthetic Firefly file, first run and cached run.

    python benchmarks/preprocess.py                      # 200k records, num_proc = CPU count, Baichuan2 tokenizer
    python benchmarks/preprocess.py --records 50000 --num-proc 4 --tokenizer bytes

Writes a Firefly-layout file (`kind`/`input`/`target`, median ~100 Chinese characters, long tail), then runs
`prepare_sft_data` twice, each in a fresh process like two training launches: the first reads, tokenizes with
`num_proc` workers, reports and writes the cache; the second loads the cache. Prints records/s for both, the
time of each stage of the first run, and what that rate means for Firefly's 1.1M records.

Tokenizer: the real Baichuan2 SentencePiece tokenizer from tests/fixtures (template baichuan_chat) when it
is there, else (or with --tokenizer bytes) the byte-level demo tokenizer (template human_assistant).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BAICHUAN2_TOKENIZER = REPO / "tests" / "fixtures" / "tokenizers" / "baichuan2"
BAICHUAN_CONFIG = REPO / "tests" / "fixtures" / "baichuan_ref" / "baichuan2_7b_h4" / "config.json"
FIREFLY_RECORDS = 1_100_000


def build_workdir(workdir: Path, records: int, tokenizer: str) -> str:
    """The data file and a model folder holding the tokenizer; returns the template name."""
    from benchmarks.common import firefly_records

    model = workdir / "model"
    if not (workdir / "train.jsonl").is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / "train.jsonl", "w", encoding="utf-8") as handle:
            for start in range(0, records, 50_000):
                rows = firefly_records(min(50_000, records - start), seed=start)
                handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if tokenizer == "baichuan2":
        model.mkdir(parents=True, exist_ok=True)
        for path in BAICHUAN2_TOKENIZER.glob("*"):
            if path.name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(path, model / path.name)
        shutil.copy(BAICHUAN_CONFIG, model / "config.json")
        return "baichuan_chat"
    if not (model / "config.json").is_file():
        from component.demo_assets import build_tokenizer

        model.mkdir(parents=True, exist_ok=True)
        build_tokenizer(corpus=["x"], vocab_size=262).save_pretrained(model)
        (model / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    return "human_assistant"


def run_once(workdir: Path, template: str, num_proc: int, overwrite: bool) -> dict:
    """One `prepare_sft_data` call as train_sft.py makes it, with the time of each stage."""
    import component.data.pipeline as dataset
    from component.config.training import build_arguments
    from component.data.supervised import prepare_sft_data
    from component.data.template import get_template
    from component.model.loader import load_tokenizer

    stages: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    dataset.read_split = timed("read", dataset.read_split)
    dataset.tokenize_split = timed("tokenize (datasets.map)", dataset.tokenize_split)
    dataset.build_report = timed("report", dataset.build_report)
    args, training_args = build_arguments(
        {
            "model_name_or_path": str(workdir / "model"),
            "train_file": str(workdir / "train.jsonl"),
            "template": template,
            "max_seq_length": 1024,
            "num_proc": num_proc,
            "data_cache_dir": str(workdir / "cache"),
            "overwrite_cache": overwrite,
            "output_dir": str(workdir / "out"),
            "report_to": "none",
        }
    )
    tokenizer = load_tokenizer(args.model_name_or_path)
    template_object = get_template(args.template, tokenizer)
    start = time.perf_counter()
    data = prepare_sft_data(args, template_object, training_args)
    total = time.perf_counter() - start
    known = sum(stages.values())
    if not data.from_cache:
        stages["cache write + reload"] = total - known
    return {"seconds": total, "examples": len(data.train), "from_cache": data.from_cache, "stages": stages}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count())
    parser.add_argument("--tokenizer", choices=["baichuan2", "bytes"], default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data file and cache here")
    parser.add_argument("--worker", choices=["first", "cached"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--template", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    if options.worker:
        result = run_once(options.workdir, options.template, options.num_proc, options.worker == "first")
        print("RESULT " + json.dumps(result), flush=True)
        return

    tokenizer = options.tokenizer or ("baichuan2" if (BAICHUAN2_TOKENIZER / "tokenizer.model").is_file() else "bytes")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = options.workdir or Path(scratch)
        start = time.perf_counter()
        template = build_workdir(workdir, options.records, tokenizer)
        size = (workdir / "train.jsonl").stat().st_size
        print(f"data: {options.records} records, {size / 2**20:.0f} MiB ({time.perf_counter() - start:.0f} s to write)")
        print(f"tokenizer: {tokenizer} (template {template}), num_proc {options.num_proc}, {os.cpu_count()} CPUs")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        results = {}
        for phase in ("first", "cached"):
            command = [sys.executable, __file__, "--worker", phase, "--workdir", str(workdir)]
            command += ["--num-proc", str(options.num_proc), "--template", template]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            process_seconds = time.perf_counter() - started
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{phase} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
            results[phase] = {**json.loads(lines[-1][len("RESULT ") :]), "process_seconds": process_seconds}
        first, cached = results["first"], results["cached"]
        assert cached["from_cache"] and not first["from_cache"]
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("| run | prepare_sft_data s | whole process s | records/s | 1.1M Firefly records (estimate) |")
        print("|---|---:|---:|---:|---:|")
        rate = options.records / first["seconds"]
        estimate = f"{FIREFLY_RECORDS / rate / 60:.1f} min"
        print(
            f"| first (read, tokenize, write cache) | {first['seconds']:.1f} | {first['process_seconds']:.1f} | "
            f"{rate:,.0f} | {estimate} |"
        )
        print(
            f"| cached (load) | {cached['seconds']:.2f} | {cached['process_seconds']:.1f} | - | about the same "
            "(memory-mapped Arrow) |"
        )
        print("first-run stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in first["stages"].items()))
        print(f"examples kept: {first['examples']}")


if __name__ == "__main__":
    main(sys.argv[1:])
