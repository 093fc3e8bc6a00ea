"""Evaluation throughput and memory: evaluate.py against stock lm-eval on the same model and files, 5-shot.

    python benchmarks/eval_throughput.py                          # each mode once
    python benchmarks/eval_throughput.py --repeats 3 --json out.json
    python benchmarks/eval_throughput.py --vocab 32000             # a real vocabulary's LM-head cost

The model is benchmarks/common.py's tiny Llama (hidden 256, 4 layers, 2048 positions, byte-level tokenizer: a
token per UTF-8 byte), random init, fp32. The data is a synthetic C-Eval folder (`--subjects` subjects, 5 dev
examples and `--questions` val questions each; Chinese text with some ASCII: questions ~`--question-tokens`
tokens, choices ~`--choice-tokens`), so a 5-shot prompt is ~1,200 tokens of which the question is ~200, about the
shape of real C-Eval prompts under a byte-level tokenizer.

Modes, each a whole process (imports, model load, tasks, scoring, outputs), in its own process (peak RSS is the
process's VmHWM), interleaved across repeats:
- `ours`: evaluate.py's recipe (`run_evaluation`: lm-eval's ceval task definitions over the folder, CachedHFLM
  with each subject's prefix cached, results.json + samples + reports);
- `ours_no_cache`: the same with `prefix_cache: false` (HFLM's own forward for every question);
- `lm_eval`: stock lm-eval, `simple_evaluate(HFLM(pretrained=FOLDER), tasks=lm-eval's ceval definitions with
  `dataset_path: csv` + `data_files`)`, its defaults otherwise (log_samples on).
All use batch size `--batch-size`. Questions/s is questions / the process's wall time; "scoring" questions/s is
over the scoring call only (run_evaluation's model loop, simple_evaluate minus model construction). Accuracy is
printed as a check that every mode scored the same answers.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: "whole process" starts here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    build_byte_model,
    interleaved_runs,
    load_average,
    machine,
    median_rows,
    peak_rss_mib,
    stock_lm_eval_config,
    text_of_tokens,
)

MODES = {
    "ours": "ours: evaluate.py (prefix cache)",
    "ours_no_cache": "ours: `prefix_cache: false`",
    "lm_eval": "stock lm-eval: simple_evaluate + HFLM",
}
SUBJECT_NAMES = ["accountant", "law", "logic", "physician", "marxism", "art_studies", "civil_servant", "sports_science"]


def build_workdir(workdir: Path, options: argparse.Namespace) -> None:
    from component.evaluate.benchmarks import write_subject

    if (workdir / "model" / "config.json").is_file():
        return
    rng = random.Random(0)

    def row() -> tuple:
        choices = [text_of_tokens(rng, options.choice_tokens).strip() for _ in range(4)]
        return (text_of_tokens(rng, options.question_tokens).strip(), choices, rng.choice("ABCD"), "解释")

    for subject in SUBJECT_NAMES[: options.subjects]:
        dev = [row() for _ in range(5)]
        write_subject(workdir / "ceval", "ceval", subject, dev, [row()[:3] for _ in range(options.questions)])
    build_byte_model(workdir / "model", options.vocab)


def run_mode(mode: str, workdir: Path, options: argparse.Namespace) -> dict:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    subjects = SUBJECT_NAMES[: options.subjects]
    if mode.startswith("ours"):
        from component.config.evaluation import EvaluateOptions
        from component.evaluate.run import run_evaluation

        evaluate_options = EvaluateOptions(
            model_name_or_path=str(workdir / "model"),
            ceval_dir=str(workdir / "ceval"),
            batch_size=options.batch_size,
            prefix_cache=mode == "ours",
            output_dir=str(workdir / f"out_{mode}"),
        )
        evaluate_options.validate()
        results, _, seconds = run_evaluation(evaluate_options)
        scores = results["models"]["base"]["ceval"]
        questions, accuracy, scoring_s = scores["n"], scores["acc"], seconds["base"]
    else:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=str(workdir / "model"), device="cpu", batch_size=options.batch_size)
        started = time.time()
        out = simple_evaluate(
            model=lm,
            tasks=[stock_lm_eval_config("ceval", s, str(workdir / "ceval")) for s in subjects],
            num_fewshot=5,
            task_manager=TaskManager(include_defaults=False),
        )
        scoring_s = time.time() - started
        questions = sum(len(samples) for samples in out["samples"].values())
        accuracy = sum(s["acc"] for samples in out["samples"].values() for s in samples) / questions
    wall = time.time() - STARTED
    return {
        "mode": mode,
        "questions": questions,
        "accuracy": accuracy,
        "wall_s": wall,
        "questions_per_s": questions / wall,
        "scoring_s": scoring_s,
        "peak_rss_mib": peak_rss_mib(),
    }


def table(rows: list[dict]) -> str:
    stock = next((r for r in rows if r["mode"] == "lm_eval"), None)
    lines = [
        "| mode | questions/s (whole process) | vs stock lm-eval | scoring questions/s | wall s | peak RSS MiB | "
        "accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['questions_per_s'] / stock['questions_per_s']:.2f}x" if stock else "n/a"
        scoring = r["questions"] / r["scoring_s"]
        lines.append(
            f"| {MODES[r['mode']]} | {r['questions_per_s']:.2f} | {ratio} | {scoring:.2f} | {r['wall_s']:.1f} "
            f"| {r['peak_rss_mib']:.0f} | {r['accuracy']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--subjects", type=int, default=4, help=f"C-Eval subjects (at most {len(SUBJECT_NAMES)})")
    parser.add_argument("--questions", type=int, default=40, help="val questions per subject")
    parser.add_argument("--question-tokens", type=int, default=120)
    parser.add_argument("--choice-tokens", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=262, help="output vocabulary (262 = the byte tokenizer's own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(variable, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if options.worker:
        print("RESULT " + json.dumps(run_mode(options.worker, options.workdir, options)), flush=True)
        return
    with tempfile.TemporaryDirectory() as scratch:
        workdir = options.workdir or Path(scratch)
        build_workdir(workdir, options)
        print(f"machine: {machine()}\nload average before: {load_average()}", flush=True)
        forwarded = [
            *("--subjects", str(options.subjects), "--batch-size", str(options.batch_size)),
            *("--threads", str(options.threads)),
        ]
        runs = interleaved_runs(
            list(options.modes),
            options.repeats,
            lambda mode: [sys.executable, __file__, "--worker", mode, "--workdir", str(workdir), *forwarded],
            lambda run: f"{run['questions_per_s']:.2f} questions/s, {run['peak_rss_mib']:.0f} MiB",
        )
        rows = median_rows(runs, ("questions_per_s", "wall_s", "scoring_s", "peak_rss_mib"))
        print(f"load average after: {load_average()}")
        print(table(rows))
        if options.json:
            options.json.write_text(json.dumps({"machine": machine(), "runs": runs, "table": rows}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
