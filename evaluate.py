"""Evaluation front end: C-Eval, CMMLU, MMLU (or any lm-eval multiple-choice task) for the base model and every
adapter, on one loaded base, offline.

    python evaluate.py --model_name_or_path BASE --adapter sft=OUT_SFT [--adapter dpo=OUT_DPO ...]
        --ceval_dir data/ceval --cmmlu_dir data/cmmlu --mmlu_dir data/mmlu [--tasks ceval,cmmlu,mmlu]
        [--subjects accountant,anatomy] [--num_fewshot 5] [--limit N] [--batch_size 8] [--quantization 4bit]
        [--protocol lm_eval|official] [--output_dir output/evaluate]
    python evaluate.py --config config/demo/evaluate.json [--key value ...]

The base is always evaluated (as "base", every adapter off), then each adapter switched on in turn. The default
protocol runs lm-evaluation-harness' own task definitions on the local files, its few-shot prefix computed once
per subject and model; `--protocol official` asks each benchmark's authors' prompts. Writes results.json,
samples/NAME/TASK.jsonl, report.md, report.html and chart.png to output_dir. docs/evaluation.md says where each
benchmark is published, what to extract where, and how to read the report.
"""

from __future__ import annotations

import logging
import os
import sys

from component.config.evaluation import EvaluateOptions
from component.config.inference import CONFIG_FLAG, parse_options
from component.config.parser import fields_of, run_cli, usage


def main(argv: list[str]) -> None:
    options = parse_options(EvaluateOptions, argv, "evaluate.py")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-subject notices, hundreds of lines
    from component.evaluate.report import difference_text, headline, task_title
    from component.evaluate.run import run_evaluation
    from component.inference.report import percent, title

    results, paths, _ = run_evaluation(options)
    protocol = results["settings"]["protocol"]
    for model, tasks in results["models"].items():
        for task, scores in tasks.items():
            key = headline(task, protocol)
            line = f"{title(model):>18} {task_title(task):>8}: {key} {percent(scores[key])} of {scores['n']}"
            if model != "base":
                line += f", vs base {difference_text(results['differences'][model][task][key])} points"
            print(line)
    print(f"Report: {paths['html']}  (also {paths['markdown']}, {paths['results']}, {paths['samples']}/)")


if __name__ == "__main__":
    # Offline: nothing here may reach a hub (lm-eval's tasks would download their datasets otherwise).
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(variable, "1")
    # Some lm-eval tasks `import evaluate` (Hugging Face's package): this file's folder goes last, so they get it.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here] + [here]
    run_cli(main, sys.argv[1:], lambda: usage("evaluate.py", __doc__, CONFIG_FLAG, fields_of(EvaluateOptions)))
