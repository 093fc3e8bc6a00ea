"""Online RL (GRPO) throughput and memory: train_rlhf.py against TRL's GRPOTrainer, same model, reward and prompts.

    python benchmarks/rl_throughput.py                        # each mode once
    python benchmarks/rl_throughput.py --repeats 3 --json out.json
    python benchmarks/rl_throughput.py --beta 0                # TRL's default beta (no reference pass)
    python benchmarks/rl_throughput.py --vocab 32000 --max-new-tokens 128   # a real vocabulary's log-prob cost
    python benchmarks/rl_throughput.py --rollout_engine vllm   # + ours with rollouts from a vLLM server (make vllm-env)

The policy is the demo base model (config/demo/model/config.json: Llama-shaped, hidden 128, 4 layers, the demo's
304-token tokenizer; random init, fp32) with a new LoRA (r 16, alpha 32, every linear layer but the head). The
reward model is a train_rm.py-style LoRA sequence-classification folder on the same base (random LoRA and score
head): ours reads the adapter folder (`reward_model`), TRL gets it merged into a plain
`AutoModelForSequenceClassification` folder (component/export/merge.py, fp32) as its `reward_funcs`. The prompts
are the first `--prompts` questions of data/demo/digits_train.jsonl, rendered by our human_assistant template;
TRL gets the same token ids (the rendered text, its special tokens included).

`--vocab N` (N > 304) widens the base model's embedding and output layer to N rows before the reward model is
built on it (`resize_token_embeddings(N, mean_resizing=False)`, as benchmarks/dpo_throughput.py does), so the
policy, the reference and the reward model's base share the wider vocabulary while the tokenizer keeps its 304
tokens: the extra rows cost what a real vocabulary costs in the LM head, the sampling and the log-prob pass. Both
trainers sample from all N ids (nothing suppressed, in neither): the ids past the tokenizer decode to nothing
(the fast tokenizer skips them, in both trainers' `batch_decode`), so the reward model sees the completion's
in-vocabulary tokens only, the same way in both, and the policy's EOS is rarely sampled (completions run to
`--max-new-tokens`).

Both run GRPO with the same group and batch: `--batch-size` prompts x `--generations` completions per step
(TRL's `per_device_train_batch_size` counts completions, ours prompts), `--max-new-tokens`, `--steps` steps,
sampling at temperature 1 with top-k 50 (our "top_k" preset; TRL's default top_k 0 is set to 50), the same
`--beta`, learning rate 1e-5 (constant), one optimisation pass per rollout. Ours runs with its defaults
(`train_rlhf.main`: the recipe's data path, the template's stop token and stop string). TRL runs with its defaults
except `bf16` and `gradient_checkpointing` off (both train in fp32 without recomputation, as ours does), `top_k`,
`beta` and the sizes above.

`--rollout_engine vllm` adds ours with `rollout_engine: vllm` (docs/rlhf.md): the worker starts vLLM's server from
`--vllm-venv` (component/inference/vllm_server.py, with the arguments `vllm_launch` would give it: the base at
`--vllm-dtype`, LoRA loaded at runtime) before timing, points the run at it (`vllm_url`), and stops it after. Its
completions/s and CPU-seconds count the server's processes too (their /proc CPU times during `trainer.train()`),
its peak memory is the trainer's VmHWM plus the server process group's summed VmHWM, and the server's start-up
time is reported apart (once per run, not per step).

Each run also gives where a step's time goes (seconds per step, means): generate (the rollout engine), adapter sync
(vLLM: save the LoRA, load it into the server, unload the old one), rewards (decode + reward model + rules),
log-probs (the reference pass, and the old-policy pass where one runs) and loss (forward + backward of the policy).
Ours logs these (`time/*`); TRL's are taken from its own profiling blocks (`transformers.generate`,
`_calculate_rewards`: the reward model only) and from timing its `_generate_and_score_completions` (its log-probs
are the rest of that: the reference pass, decoding, padding) and `training_step` (loss: the rest of the step).

Each mode runs in its own process (peak RSS is the whole process's VmHWM), modes alternate across repeats,
the table gives medians: completions/s (completions / wall time of `trainer.train()`), completions per CPU-second
of the process during `trainer.train()` (with `--threads 1`, the work done, which other processes on the cores
disturb far less than the wall time), peak RSS, the mean completion length (a run that stops earlier generates
less) and the mean reward-model score.
TRL is a benchmark-only dependency (requirements-dev.txt); without it its mode is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import TrainerCallback  # noqa: E402

from benchmarks.common import (  # noqa: E402
    interleaved_runs,
    load_average,
    machine,
    median_rows,
    peak_rss_mib,
    process_group_cpu_seconds,
    process_group_peak_rss_mib,
)

MODES = {
    "ours": "ours: train_rlhf.py (grpo)",
    "ours_vllm": "ours, vLLM rollouts",
    "trl_default": "TRL GRPOTrainer",
}
SPLIT = ("generate", "adapter_sync", "rewards", "logprobs", "loss")
LORA = {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0}
TEMPLATE = "human_assistant"
TOP_K = 50  # our "top_k" preset (temperature 1, top-p 1)


def max_seq_length(max_new_tokens: int) -> int:
    """Ours' (and the reward model's) sequence limit: 128, or room for 112 prompt tokens past longer completions."""
    return max(128, 112 + max_new_tokens)


def build_workdir(workdir: Path, prompts: int, vocab: int = 0, max_new_tokens: int = 16) -> None:
    """The base model, the prompts (JSONL as our readers take them), the reward adapter and its merged copy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from component.demo_assets import build_tiny_model, build_tokenizer
    from component.export.merge import merge_adapter

    if (workdir / "rm_merged" / "config.json").is_file():  # written last
        return
    workdir.mkdir(parents=True, exist_ok=True)
    config = json.loads((REPO / "config/demo/model/config.json").read_text(encoding="utf-8"))
    tokenizer = build_tokenizer()
    build_tiny_model(workdir / "model", config=config, seed=0, tokenizer=tokenizer)
    if vocab > len(tokenizer):  # before the reward model: its base shares the vocabulary
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(workdir / "model")
        model.resize_token_embeddings(vocab, mean_resizing=False)
        model.save_pretrained(workdir / "model")
        del model
    lines = (REPO / "data/demo/digits_train.jsonl").read_text(encoding="utf-8").splitlines()[:prompts]
    (workdir / "prompts.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    from component.data.template import get_template

    template = get_template(TEMPLATE, tokenizer)
    rendered = []
    for line in lines:  # TRL's prompts: our rendering as text, special tokens kept, so its tokenizer gives our ids
        ids = template.encode_prompt([], json.loads(line)["input"])
        rendered.append(tokenizer.decode(ids, skip_special_tokens=False))
        assert tokenizer(rendered[-1])["input_ids"] == ids
    (workdir / "trl_prompts.json").write_text(json.dumps(rendered, ensure_ascii=False), encoding="utf-8")

    import torch

    torch.manual_seed(0)
    reward = AutoModelForSequenceClassification.from_pretrained(
        workdir / "model", num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", modules_to_save=["score"], task_type="SEQ_CLS")
    reward = get_peft_model(reward, lora)
    with torch.no_grad():  # a reward model that is not constant: LoRA B away from 0
        for name, parameter in reward.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    reward.save_pretrained(workdir / "rm")
    tokenizer.save_pretrained(workdir / "rm")
    train_args = {"model_name_or_path": str(workdir / "model"), "template": TEMPLATE}
    train_args["max_seq_length"] = max_seq_length(max_new_tokens)
    (workdir / "rm" / "train_args.json").write_text(json.dumps(train_args), encoding="utf-8")
    merge_adapter(str(workdir / "rm"), str(workdir / "rm_merged"), dtype="float32")


class WallClock(TrainerCallback):
    """Times `trainer.train()` from its train-begin to its train-end callback: wall and CPU time of this process
    and of the vLLM server's process group (`server`, where one runs)."""

    started = ended = cpu_started = cpu_ended = 0.0
    server = None

    def cpu(self) -> float:
        return time.process_time() + (process_group_cpu_seconds(self.server.process.pid) if self.server else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.cpu_started = time.perf_counter(), self.cpu()

    def on_train_end(self, args, state, control, **kwargs):
        self.ended, self.cpu_ended = time.perf_counter(), self.cpu()


def start_vllm(workdir: Path, options: argparse.Namespace, args: dict):
    """vLLM's server for the run, started as `vllm_launch` would start it (the same arguments)."""
    from types import SimpleNamespace

    from component.inference.vllm_server import server_environment, start_server, venv_python
    from component.train.rollout import server_arguments

    launch = SimpleNamespace(
        vllm_dtype=options.vllm_dtype,
        max_seq_length=args["max_seq_length"],
        lora_rank=LORA["lora_rank"],
        adapter_name_or_path=None,
        trust_remote_code=False,
        vllm_gpu_memory_utilization=None,
        vllm_devices=None,
        vllm_args=["--enforce-eager"] if options.vllm_eager else [],
    )
    started = time.perf_counter()
    server = start_server(
        workdir / "model",
        server_arguments(launch, SimpleNamespace(seed=args["seed"])),
        workdir / f"vllm_server.{os.getpid()}.log",
        python=venv_python(options.vllm_venv),
        env=server_environment(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True"),
    )
    return server, time.perf_counter() - started


def run_ours(workdir: Path, options: argparse.Namespace, clock, engine: str = "transformers") -> tuple:
    import train_rlhf

    args = {
        "model_name_or_path": str(workdir / "model"),
        "train_file": str(workdir / "prompts.jsonl"),
        "template": TEMPLATE,
        "max_seq_length": max_seq_length(options.max_new_tokens),
        "finetuning_type": "lora",
        **LORA,
        "algorithm": "grpo",
        "reward_model": str(workdir / "rm"),
        "num_generations": options.generations,
        "beta": options.beta,
        "generation_preset": "top_k",
        "max_new_tokens": options.max_new_tokens,
        "output_dir": str(workdir / "ours_out"),
        "data_cache_dir": str(workdir / "cache"),
        "per_device_train_batch_size": options.batch_size,
        "per_device_eval_batch_size": options.batch_size * options.generations,
        "max_steps": options.steps,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "sample_log_steps": 1000,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    extra: dict = {}
    if engine == "vllm":
        clock.server, extra["server_start_s"] = start_vllm(workdir, options, args)
        args.update(rollout_engine="vllm", vllm_url=clock.server.url, output_dir=str(workdir / "ours_vllm_out"))
    path = workdir / f"{engine}_args.json"
    path.write_text(json.dumps(args), encoding="utf-8")
    try:
        trainer = train_rlhf.main(["--train_args_file", str(path)], callbacks=[clock])
        if clock.server is not None:
            extra["server_peak_rss_mib"] = process_group_peak_rss_mib(clock.server.process.pid)
    finally:
        if clock.server is not None:
            clock.server.stop()
    history = trainer.state.log_history
    steps = trainer.state.global_step
    extra["split"] = {
        name: sum(e.get(f"time/{name}_s", 0.0) for e in history) / steps for name in SPLIT
    }  # logging_steps 1, one rollout per step: each entry is one step's
    return steps, history, "rewards/reward_model/mean", extra


def run_trl(workdir: Path, options: argparse.Namespace, clock) -> tuple:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    # Nothing of ours is imported here: TRL's process holds only what TRL needs.
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    prompts = json.loads((workdir / "trl_prompts.json").read_text(encoding="utf-8"))
    config = GRPOConfig(
        output_dir=str(workdir / "trl_out"),
        per_device_train_batch_size=options.batch_size * options.generations,
        num_generations=options.generations,
        max_completion_length=options.max_new_tokens,
        top_k=TOP_K,
        beta=options.beta,
        max_steps=options.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, target_modules="all-linear"
    )
    split = dict.fromkeys(SPLIT, 0.0)
    scored = {"generate_and_score": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        """TRL's trainer with its step timed: generate and score (its rollout), and the whole training step."""

        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                scored["generate_and_score"] += time.perf_counter() - started

        def training_step(self, *args, **kwargs):
            started, before = time.perf_counter(), scored["generate_and_score"]
            try:
                return super().training_step(*args, **kwargs)
            finally:
                split["loss"] += time.perf_counter() - started - (scored["generate_and_score"] - before)

    # TRL's own profiling blocks, the outermost of each kind only (reward functions nest in _calculate_rewards;
    # _prepare_inputs holds the whole rollout; log-probs and loss are derived from the two timers above)
    blocks = {
        "transformers.generate": "generate",
        "transformers.generate_batch": "generate",
        "vLLM.generate": "generate",
        "sync_weights": "adapter_sync",
        "_calculate_rewards": "rewards",
    }

    def record(context, duration: float) -> None:  # context.name is "<trainer class>.<block>"
        block = context.name.split(".", 1)[-1]
        if block in blocks:
            split[blocks[block]] += duration

    from trl.extras import profiling

    profiling.ProfilingContext._log_metrics = record
    trainer = TimedGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(workdir / "model"),
        reward_funcs=str(workdir / "rm_merged"),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[clock],
    )
    trainer.train()
    steps = trainer.state.global_step
    split["logprobs"] = scored["generate_and_score"] - split["generate"] - split["rewards"] - split["adapter_sync"]
    extra = {"split": {name: value / steps for name, value in split.items()}}
    return steps, trainer.state.log_history, "rewards/rm_merged/mean", extra


def run_mode(mode: str, workdir: Path, options: argparse.Namespace) -> dict:
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    clock = WallClock()
    if mode == "trl_default":
        steps, history, reward_key, extra = run_trl(workdir, options, clock)
    else:
        steps, history, reward_key, extra = run_ours(
            workdir, options, clock, "vllm" if mode == "ours_vllm" else "transformers"
        )
    wall = clock.ended - clock.started
    completions = steps * options.batch_size * options.generations
    logged = [e for e in history if "completions/mean_length" in e]
    rewards = [e[reward_key] for e in history if reward_key in e]
    return {
        "mode": mode,
        "completions": completions,
        "completions_per_s": completions / wall,
        "wall_s": wall,
        "cpu_s": clock.cpu_ended - clock.cpu_started,
        "completions_per_cpu_s": completions / (clock.cpu_ended - clock.cpu_started),
        "peak_rss_mib": peak_rss_mib() + extra.get("server_peak_rss_mib", 0.0),
        "trainer_peak_rss_mib": peak_rss_mib(),
        "server_peak_rss_mib": extra.get("server_peak_rss_mib", 0.0),
        "server_start_s": extra.get("server_start_s", 0.0),
        **{f"{name}_s": value for name, value in extra["split"].items()},
        "steps": steps,
        "mean_length": statistics.mean(e["completions/mean_length"] for e in logged),
        "reward": statistics.mean(rewards) if rewards else float("nan"),
    }


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["mode"] == "trl_default"), None)
    lines = [
        "| mode | completions/s | vs TRL | completions/CPU-s | vs TRL | peak RSS MiB | vs TRL | steps | mean length "
        "| mean RM score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['completions_per_s'] / base['completions_per_s']:.2f}x" if base else "-"
        work = f"{r['completions_per_cpu_s'] / base['completions_per_cpu_s']:.2f}x" if base else "-"
        memory = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else "-"
        lines.append(
            f"| {MODES[r['mode']]} | {r['completions_per_s']:.1f} | {speed} | {r['completions_per_cpu_s']:.1f} | {work} "
            f"| {r['peak_rss_mib']:.0f} | {memory} | {r['steps']} | {r['mean_length']:.1f} | {r['reward']:.3f} |"
        )
    lines += [
        "",
        "| mode | s/step | generate | adapter sync | rewards | log-probs | loss | trainer / server peak RSS MiB "
        "| server start s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        split = " | ".join(f"{r[f'{name}_s']:.2f}" for name in SPLIT)
        server = (
            f"{r['trainer_peak_rss_mib']:.0f} / {r['server_peak_rss_mib']:.0f}" if r["server_peak_rss_mib"] else "-"
        )
        start = f"{r['server_start_s']:.0f}" if r["server_start_s"] else "-"
        lines.append(f"| {MODES[r['mode']]} | {r['wall_s'] / r['steps']:.2f} | {split} | {server} | {start} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=None, help="default: ours, trl_default")
    parser.add_argument(
        "--rollout_engine", choices=["transformers", "vllm"], default="transformers", help="vllm: add ours_vllm"
    )
    parser.add_argument("--vllm-venv", default=None, help="make vllm-env's environment (default .venv-vllm)")
    parser.add_argument("--vllm-dtype", default="float32", help="the served base's dtype (the trainer's: float32)")
    parser.add_argument("--vllm-eager", action="store_true", help="--enforce-eager (no torch.compile in vLLM)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight in both (ours: 0.04, TRL's default: 0)")
    parser.add_argument("--vocab", type=int, default=0, help="output vocabulary (0: the tokenizer's own 304)")
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
        build_workdir(workdir, options.batch_size * options.steps, options.vocab, options.max_new_tokens)
        modes = options.modes or ["ours", *(["ours_vllm"] if options.rollout_engine == "vllm" else []), "trl_default"]
        try:
            import trl  # noqa: F401
        except ImportError:
            print("trl is not installed: skipping its mode", file=sys.stderr)
            modes = [m for m in modes if m != "trl_default"]
        print(f"machine: {machine()}\nload average before: {load_average()}", flush=True)
        forwarded = ["--batch-size", str(options.batch_size), "--generations", str(options.generations)]
        forwarded += ["--max-new-tokens", str(options.max_new_tokens), "--steps", str(options.steps)]
        forwarded += ["--beta", str(options.beta), "--threads", str(options.threads)]
        forwarded += [
            "--vllm-dtype",
            options.vllm_dtype,
            *(["--vllm-venv", options.vllm_venv] if options.vllm_venv else []),
        ]
        forwarded += ["--vllm-eager"] if options.vllm_eager else []
        runs = interleaved_runs(
            modes,
            options.repeats,
            lambda mode: [sys.executable, __file__, "--worker", mode, "--workdir", str(workdir), *forwarded],
            lambda run: (
                f"{run['completions_per_s']:.1f} completions/s, {run['peak_rss_mib']:.0f} MiB, "
                f"mean length {run['mean_length']:.1f}"
            ),
        )
        keys = (
            "completions_per_s",
            "completions_per_cpu_s",
            "wall_s",
            "cpu_s",
            "peak_rss_mib",
            "trainer_peak_rss_mib",
            "server_peak_rss_mib",
            "server_start_s",
            *(f"{name}_s" for name in SPLIT),
            "mean_length",
            "reward",
        )
        rows = median_rows(runs, keys)
        print(f"load average after: {load_average()}")
        print(table(rows))
        if options.json:
            options.json.write_text(json.dumps({"machine": machine(), "runs": runs, "table": rows}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
