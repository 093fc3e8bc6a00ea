"""Benchmarks (C-Eval, CMMLU, MMLU, lm-eval tasks) for the base and every adapter: benchmark files -> lm-eval
tasks, the prefix-cached scorer, the authors' protocol, scores with intervals, reports."""
