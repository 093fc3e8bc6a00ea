"""What the benchmarks share: the tiny model's config, synthetic Chinese text and Firefly records, the machine
line, runs in their own processes with interleaved order, medians, and peak memory of a process."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODEL_CONFIG = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
KINDS = ["Summary", "Translation", "ClassicalChinese", "Poetry", "Couplet", "MRC", "NER", "Cot", "StoryGeneration"]
# Common characters and punctuation: 3 UTF-8 bytes (3 tokens) each, like real Chinese instruction data.
HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
    "多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还"
    "因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结"
    "，。、：；？！"
)
ASCII_WORDS = ["the", "data", "model", "answer", "2023", "AI", "GPU", "OK", "Python", "list", "value", "step"]
TEMPLATE_OVERHEAD = 24  # <s>Human: ...\n\nAssistant: ...</s> in byte tokens


# --- data ------------------------------------------------------------------------------------------------------
def text_of_tokens(rng: random.Random, tokens: int) -> str:
    """Mostly Chinese with some ASCII, about `tokens` UTF-8 bytes long."""
    pieces, size = [], 0
    while size < tokens:
        if rng.random() < 0.08:
            piece = " " + rng.choice(ASCII_WORDS) + " "
        elif rng.random() < 0.02:
            piece = "\n"
        else:
            piece = rng.choice(HANZI)
        pieces.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(pieces)


def firefly_records(count: int, seed: int = 0, median: int = 300, sigma: float = 0.65, longest: int = 1900) -> list:
    """Firefly-layout records whose tokenized lengths are log-normal (median ~300), the longest ~`longest`."""
    rng = random.Random(seed)
    lengths = [min(longest, max(40, int(math.exp(rng.gauss(math.log(median), sigma))))) for _ in range(count)]
    lengths[rng.randrange(count)] = longest  # the long tail, whatever the seed drew
    return records_of_lengths(rng, lengths)


def uniform_records(count: int, seed: int = 0, shortest: int = 40, longest: int = 1024) -> list:
    """Firefly-layout records whose tokenized lengths are spread evenly from `shortest` to `longest`."""
    rng = random.Random(seed)
    return records_of_lengths(rng, [rng.randint(shortest, longest) for _ in range(count)])


# --data of the SFT benchmarks: a long-tailed spread (most examples short, a few long) and an even one.
DATASETS = {"longtail": firefly_records, "uniform": uniform_records}


def records_of_lengths(rng: random.Random, lengths: list[int]) -> list:
    """One Firefly record (`kind`, `input`, `target`) per total length in byte tokens, the prompt 15-45% of it."""
    records = []
    for total in lengths:
        body = total - TEMPLATE_OVERHEAD
        prompt = max(6, int(body * rng.uniform(0.15, 0.45)))
        records.append(
            {
                "kind": rng.choice(KINDS),
                "input": text_of_tokens(rng, prompt),
                "target": text_of_tokens(rng, max(3, body - prompt)),
            }
        )
    return records


class CountingCollator:
    """Wraps a collator: positions the model runs on and label tokens it trains on (labels[..., 1:])."""

    def __init__(self, collator) -> None:
        self.collator, self.positions, self.label_tokens, self.batches = collator, 0, 0, 0

    def __call__(self, features):
        batch = self.collator(features)
        self.positions += batch["input_ids"].numel()
        self.label_tokens += int((batch["labels"][..., 1:] != -100).sum())
        self.batches += 1
        return batch


def build_byte_model(folder: Path, vocab: int = 262, config: dict | None = None) -> Path:
    """A random-init model of MODEL_CONFIG with a byte-level tokenizer (the 256 bytes and 6 special tokens, no
    merges); `vocab` > 262 widens the embeddings and output layer as a real vocabulary would (the tokenizer keeps
    its 262 tokens: the extra rows cost what a real vocabulary costs in the LM head)."""
    from component.demo_assets import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer(corpus=["x"], vocab_size=262)
    build_tiny_model(folder, config=config or MODEL_CONFIG, seed=0, tokenizer=tokenizer)
    if vocab > len(tokenizer):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        model.resize_token_embeddings(vocab, mean_resizing=False)
        model.save_pretrained(folder)
    return folder


def stock_lm_eval_config(benchmark: str, subject: str, folder: str) -> dict:
    """lm-eval's own task definition of a C-Eval, CMMLU or MMLU subject, reading the local CSV files the way
    lm-eval reads files (`dataset_path: csv` + `data_files`), independently of component.evaluate: the stock side
    of the parity tests and of benchmarks/eval_throughput.py. MMLU's header-less CSV gets column names and its
    letters mapped onto lm-eval's cais/mmlu columns (choices as a list, the answer as an int)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks = Path(lm_eval.__file__).parent / "tasks"
    words = subject.replace("_", " ")
    name, split, files, known, default, description = {
        "ceval": (
            f"ceval-valid_{subject}",
            "val",
            ("dev/{s}_dev.csv", "val/{s}_val.csv"),
            tasks / f"ceval/ceval-valid_{subject}.yaml",
            tasks / "ceval/_default_ceval_yaml",
            f"以下是中国关于{words}的单项选择题，请选出其中的正确答案。\n\n",
        ),
        "cmmlu": (
            f"cmmlu_{subject}",
            "test",
            ("dev/{s}.csv", "test/{s}.csv"),
            tasks / f"cmmlu/cmmlu_{subject}.yaml",
            tasks / "cmmlu/_default_template_yaml",
            f"以下是关于{words}的单项选择题，请直接给出正确答案的选项。\n\n",
        ),
        "mmlu": (
            f"mmlu_{subject}",
            "test",
            ("dev/{s}_dev.csv", "test/{s}_test.csv"),
            tasks / f"mmlu/default/mmlu_{subject}.yaml",
            tasks / "mmlu/default/_default_template_yaml",
            f"The following are multiple choice questions (with answers) about {words}.\n\n",
        ),
    }[benchmark]
    config = load_yaml(known) if known.is_file() else {**load_yaml(default), "description": description}
    config.pop("tag", None)
    data_files = {config["fewshot_split"]: f"{folder}/{files[0].format(s=subject)}"}
    data_files[split] = f"{folder}/{files[1].format(s=subject)}"
    config.update(task=name, dataset_path="csv", dataset_name=None, dataset_kwargs={"data_files": data_files})
    if benchmark == "mmlu":
        config["dataset_kwargs"]["column_names"] = ["question", "A", "B", "C", "D", "answer"]
        config["process_docs"] = _cais_mmlu
    return config


def _cais_mmlu(dataset):
    mapped = dataset.map(lambda d: {"choices": [d[x] for x in "ABCD"], "label": "ABCD".index(d["answer"])})
    return mapped.remove_columns("answer").rename_column("label", "answer")


# --- runs, the machine, memory ----------------------------------------------------------------------------------
def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    import torch
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def run_worker(command: list[str], what: str) -> dict:
    """One benchmark run in its own process (so peak memory is per run): the dict of its RESULT line."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def interleaved_runs(
    modes: list[str], repeats: int, command_of: Callable[[str], list[str]], describe: Callable[[dict], str]
) -> dict[str, list[dict]]:
    """Each mode `repeats` times, each run in its own process (`run_worker`), the order rotated every round so no
    mode always runs first on a machine whose load drifts; one progress line per run."""
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for repeat in range(repeats):
        for mode in modes[repeat % len(modes) :] + modes[: repeat % len(modes)]:
            run = run_worker(command_of(mode), mode)
            runs[mode].append(run)
            print(f"  [{repeat + 1}/{repeats}] {mode}: {describe(run)} (load {load_average()})", flush=True)
    return runs


def median_rows(runs: dict[str, list[dict]], keys: tuple[str, ...]) -> list[dict]:
    """One row per mode: its first run with `keys` replaced by their medians over the runs."""
    return [
        {**mode_runs[0], **{key: statistics.median(r[key] for r in mode_runs) for key in keys}}
        for mode_runs in runs.values()
    ]


def peak_rss_mib() -> float:
    """This process's own peak RSS: VmHWM, not ru_maxrss, which keeps the launching process's peak across exec."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_kib() -> int:
    """Resident set size now (ru_maxrss would include the parent's peak: Linux keeps it across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- greedy decoding speed (onnx_latency.py, serving_latency.py) -------------------------------------------------
def random_prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """`batch` prompts of `length` random token ids in [3, vocab), the same ones for a given batch size."""
    import numpy as np

    rng = np.random.default_rng(batch)
    return [rng.integers(3, vocab, length).tolist() for _ in range(batch)]


def torch_greedy(model, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' generate() as generate.py's engine calls it (greedy, KV cache), exactly `new_tokens` each."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor(batch)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].tolist()


def onnx_greedy(decoder, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Our onnxruntime engine's loop (`OnnxDecoder.generate`), greedy, no stop tokens: exactly `new_tokens` each."""
    import numpy as np

    from component.config.generation import resolve_settings

    settings = resolve_settings("greedy", {"max_new_tokens": new_tokens})
    return decoder.generate(batch, settings, new_tokens, 0, [], np.random.default_rng(0)).tolist()


def timed_generations(
    prefill: Callable[[list[list[int]]], object],
    generate: Callable[[list[list[int]]], list[list[int]]],
    batches: dict[str, list[list[int]]],
) -> dict[str, dict]:
    """Per batch size: one warm-up generation (first-run allocations, kernel choices), then the prefill alone and
    the whole generation timed; {"seconds", "prefill_seconds", "tokens"}."""
    results = {}
    for size, batch in batches.items():
        generate(batch)
        started = time.perf_counter()
        prefill(batch)
        prefill_seconds = time.perf_counter() - started
        started = time.perf_counter()
        tokens = generate(batch)
        results[size] = {"seconds": time.perf_counter() - started, "prefill_seconds": prefill_seconds, "tokens": tokens}
    return results


def speed_rows(runs: dict[str, list[dict]], labels: dict[str, str], new_tokens: int) -> list[tuple]:
    """(batch, label, tokens/s, vs the first mode, prefill ms, generation s, tokens = the first mode's) per batch size
    and mode, from medians over the runs; the first mode (PyTorch) is the reference."""
    modes = list(runs)
    rows = []
    for size in runs[modes[0]][0]:
        if not isinstance(runs[modes[0]][0][size], dict):
            continue
        reference = runs[modes[0]][0][size]["tokens"]
        seconds = {mode: statistics.median(run[size]["seconds"] for run in runs[mode]) for mode in modes}
        for mode in modes:
            rate = int(size) * new_tokens / seconds[mode]
            prefill = statistics.median(run[size]["prefill_seconds"] for run in runs[mode])
            same = "yes" if runs[mode][0][size]["tokens"] == reference else "no"
            rows.append(
                (size, labels[mode], rate, seconds[modes[0]] / seconds[mode], prefill * 1000, seconds[mode], same)
            )
    return rows


def compare_speeds(
    modes: list[str],
    repeats: int,
    command_of: Callable[[str], list[str]],
    labels: dict[str, str],
    new_tokens: int,
    settings: str,
    json_path: Path | None = None,
) -> None:
    """The runs of `modes` (interleaved_runs, load averages around them), then the machine, `settings` and the
    table of speed_rows, the first mode the reference; every run and the table also to `json_path`."""
    print(f"load average before: {load_average()}", flush=True)
    runs = interleaved_runs(
        modes,
        repeats,
        command_of,
        lambda run: ", ".join(f"batch {size} {r['seconds']:.2f} s" for size, r in run.items() if isinstance(r, dict)),
    )
    print(f"load average after: {load_average()}")
    rows = speed_rows(runs, labels, new_tokens)
    print(f"\n{machine()}; {settings}, median of {repeats}\n")
    print(f"| batch | runtime | tokens/s | vs {modes[0]} | prefill ms | generation s | tokens = {modes[0]}'s |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for size, label, rate, ratio, prefill_ms, seconds, same in rows:
        print(f"| {size} | {label} | {rate:.1f} | {ratio:.2f}x | {prefill_ms:.1f} | {seconds:.2f} | {same} |")
    if json_path:
        json_path.write_text(json.dumps({"runs": runs, "table": rows}, indent=2), encoding="utf-8")


def _process_group(pgid: int) -> list[Path]:
    """/proc folders of every process in process group `pgid` (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(entry)
            except (OSError, ProcessLookupError):
                continue
    return found


def process_group_peak_rss_mib(pgid: int) -> float:
    """Summed peak RSS (VmHWM) of the live processes of a process group, e.g. a vLLM server and its engine."""
    total = 0
    for folder in _process_group(pgid):
        try:
            lines = (folder / "status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")), 0)
    return total / 1024


def process_group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds used so far by the live processes of a process group."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for folder in _process_group(pgid):
        try:
            fields = (folder / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks
