#!/usr/bin/env bash
# GPU throughput check: QLoRA steps of a ~1.1B Llama-shaped random-init model, padded vs grouped vs packed.
#
#   sh benchmarks/gpu_check.sh                 # from the repository root, on a single-GPU machine
#   STEPS=40 OUT=/tmp/out sh benchmarks/gpu_check.sh
#   SMOKE=1 sh benchmarks/gpu_check.sh         # the same script on a CPU with a tiny model: checks it runs
#
# No network needed. Beyond torch (CUDA build) and transformers it needs accelerate, peft, bitsandbytes,
# datasets and sentencepiece (and datasets' own dependencies); missing ones are installed from wheels in
# $WHEELS (default benchmarks/wheels/), see benchmarks/README.md. Builds its own model (TinyLlama-1.1B shape:
# hidden 2048, 22 layers, 32 heads, 4 KV heads, vocab 32000, random init, bf16) and data (synthetic
# Firefly-layout records, median ~300 tokens, long tail, max length 1024), then runs each mode in its own
# process through our real path (load_model QLoRA 4-bit NF4 + LoRA r16 on every linear layer, gradient
# checkpointing, bf16; use_packing/make_collator; train.sft.SFTTrainer, chunked LM head), batch 8, $STEPS steps. Reports label
# tokens/s over the steps after warm-up and peak GPU memory; writes gpu_check.json/.md to $OUT when set.
# Modes: padded (random order), group_by_length, our default with SDPA (packing, rows of at most the batch's
# longest example: dense row x row masks), packing with SDPA in one flat row per batch, and, when flash-attn
# is importable, group_by_length and our default (one flat row, varlen kernel) with flash_attention_2.
# Second part (skip with BAICHUAN=0): peak GPU memory of QLoRA on a Baichuan2-13B-shaped model (hidden 5120,
# 40 layers, 40 heads, intermediate 13696, vocabulary 125,696, ALiBi, NormHead; random init, bf16, ~26 GB
# written to $WORK once), 1,024-token examples, batch 1 and 4, with `logits_path: "chunked"` (train.lm_head)
# and `"model"` (the model's own logits and loss), gradient checkpointing, 3 optimizer steps each. Needs ~60 GB
# of disk and a GPU with >= 40 GB; budget ~10 minutes (most of it writing and quantizing the weights).
#
# Then the scale-out cases, one torchrun process per visible GPU (SMOKE: 2 CPU processes, gloo): LoRA and full
# fine-tuning (bf16) under DeepSpeed ZeRO-3 (config/deepspeed/zero3.json) and FSDP2 (config/fsdp/full_shard.json),
# and QLoRA under FSDP2 (bnb_4bit_quant_storage bf16; GPU only): tokens/s per GPU (non-padding input tokens,
# Trainer's num_input_tokens_seen) and peak memory per GPU (max over ranks). SCALE=0 skips them.
# Budget: under 8 minutes on an H100 for the first part, ~10 for the Baichuan part, ~3 for the scale-out cases.
set -eu

cd "$(dirname "$0")/.."
STEPS="${STEPS:-30}"
WHEELS="${WHEELS:-benchmarks/wheels}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
PYTHON="${PYTHON:-python}"

SMOKE="${SMOKE:-}"
if [ -z "$SMOKE" ]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))"
fi
missing=""
for module in accelerate peft bitsandbytes datasets sentencepiece; do
    "$PYTHON" -c "import $module" 2>/dev/null || missing="$missing $module"
done
if [ -n "$missing" ]; then
    echo "installing from $WHEELS:$missing"
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" $missing
fi
if [ "${SCALE:-1}" != "0" ] && ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then  # only the ZeRO-3 cases need it
    DS_BUILD_OPS=0 "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" deepspeed \
        || echo "deepspeed is not installed (and not in $WHEELS): the ZeRO-3 cases will fail"
fi

cat > "$WORK/gpu_check.py" <<'PY'
import json, os, subprocess, sys, time
from pathlib import Path

REPO = Path.cwd()
sys.path[:0] = [str(REPO)]
WORK, STEPS = Path(sys.argv[1]), int(sys.argv[2])
SMOKE = bool(os.environ.get("SMOKE"))  # CPU, tiny model: checks the script, measures nothing
MODEL = {
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "initializer_range": 0.02, "vocab_size": 32000,
}
if SMOKE:
    MODEL.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1000)
DEVICE = "cpu" if SMOKE else "cuda"
MODES = {  # name: (our train-args keys, attention implementation)
    "padded (sdpa)": ({"packing": False}, "sdpa"),
    "group_by_length (sdpa)": ({"group_by_length": True}, "sdpa"),
    "default = packing, rows <= longest example (sdpa)": ({}, "sdpa"),
    "packing, one flat row (sdpa)": ({"packing": True, "packing_row_tokens": 8 * 1024}, "sdpa"),
    "group_by_length (flash_attention_2)": ({"group_by_length": True}, "flash_attention_2"),
    "default = packing, one flat row (flash_attention_2)": ({}, "flash_attention_2"),
}


def prepare():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from component.demo_assets import build_tokenizer
    from benchmarks.common import firefly_records

    model_dir = WORK / "model"
    if not (model_dir / "config.json").is_file():
        tokenizer = build_tokenizer(corpus=["x"], vocab_size=262)  # byte-level; ids < 262 of a 32000 vocab
        config = AutoConfig.for_model(**{**MODEL, "bos_token_id": tokenizer.bos_token_id,
                                         "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
        rows = firefly_records(100 if SMOKE else 1200, seed=1)
        (WORK / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def train_args(keys):
    return {
        "model_name_or_path": str(WORK / "model"), "train_file": str(WORK / "train.jsonl"), "max_seq_length": 1024,
        "finetuning_type": "qlora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05,
        "data_cache_dir": str(WORK / "cache"), "output_dir": str(WORK / "out"), "per_device_train_batch_size": 8,
        "max_steps": STEPS, "learning_rate": 2e-4, "bf16": not SMOKE, "gradient_checkpointing": True, "logging_steps": 10,
        "save_strategy": "no", "report_to": "none", "seed": 0, **keys,
    }


def run_mode(name):
    import torch
    from transformers import TrainerCallback
    from component.config.training import build_arguments
    from component.data.supervised import prepare_sft_data
    from component.data.template import get_template
    from component.model.loader import load_model, load_tokenizer
    from component.train.batching import make_collator, use_packing
    from component.train.sft import SFTTrainer

    keys, attention = MODES[name]
    args, training_args = build_arguments(train_args({**keys, "attn_implementation": attention}))
    tokenizer = load_tokenizer(args.model_name_or_path)
    data = prepare_sft_data(args, get_template(args.template, tokenizer), training_args)
    model = load_model(args, training_args.gradient_checkpointing)
    packing = use_packing(args, training_args, model)
    collator = make_collator(args, training_args, tokenizer, packing, model)
    counts, times = [], []

    def counting(features):
        batch = collator(features)
        counts.append((int((batch["labels"][..., 1:] != -100).sum()), batch["input_ids"].numel(),
                       sum(len(f["input_ids"]) for f in features)))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=data.train, data_collator=counting,
                         callbacks=[Clock()], logits_path=args.logits_path, logits_chunk_size=args.logits_chunk_size)
    result = trainer.train()
    warm = min(5, STEPS // 3)  # steps 1..warm: allocator and kernel warm-up, not timed
    labels = sum(c[0] for c in counts[warm:len(times)])
    positions = sum(c[1] for c in counts[:len(times)])
    real = sum(c[2] for c in counts[:len(times)])
    seconds = times[-1] - times[warm - 1]
    return {"mode": name, "label_tokens_per_s": labels / seconds, "tokens_per_s": sum(c[2] for c in counts[warm:len(times)]) / seconds,
            "step_s": seconds / (len(times) - warm), "padding_fraction": 1 - real / positions,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0, "loss": result.training_loss,
            "batching": ("packed" if packing else "padded") + f", {training_args.train_sampling_strategy} sampler"
            + (f", row budget {collator.row_tokens}" if packing else "")}


SCALE_CASES = {  # name: (our train-args keys + TrainingArguments keys), run under torchrun on every GPU
    "LoRA, ZeRO-3": {"finetuning_type": "lora", "deepspeed": "config/deepspeed/zero3.json"},
    "full, ZeRO-3": {"finetuning_type": "full", "deepspeed": "config/deepspeed/zero3.json"},
    "LoRA, FSDP2": {"finetuning_type": "lora", "fsdp": True, "fsdp_config": "config/fsdp/full_shard.json"},
    "full, FSDP2": {"finetuning_type": "full", "fsdp": True, "fsdp_config": "config/fsdp/full_shard.json"},
    "QLoRA, FSDP2": {"finetuning_type": "qlora", "bnb_4bit_quant_storage": "bfloat16", "fsdp": True,
                     "fsdp_config": "config/fsdp/full_shard.json"},
}


def run_scale_case(name):
    """One rank of a scale-out case (under torchrun): train_sft.main with a meter; rank 0 prints the RESULT."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback
    import train_sft

    if SMOKE:  # accelerate drops the FSDP plugin on MULTI_CPU; the tests' probe restores it (CPU only)
        from tests.recipes.scale_out_probe import fsdp_on_cpu
        fsdp_on_cpu()
    keys = {**train_args({}), "per_device_train_batch_size": 4, "gradient_checkpointing": True,
            "include_num_input_tokens_seen": "non_padding", "output_dir": str(WORK / "scale_out"), **SCALE_CASES[name]}
    keys.pop("packing", None)
    if keys["finetuning_type"] == "full":
        keys["learning_rate"] = 2e-5
    args_file = WORK / f"scale_{os.environ.get('RANK', '0')}.json"
    args_file.write_text(json.dumps(keys))
    marks = []

    class Meter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_sft.main(["--train_args_file", str(args_file)], callbacks=[Meter()])
    warm = min(5, len(marks) // 3)
    (t0, n0), (t1, n1) = marks[warm - 1] if warm else (marks[0][0], 0), marks[-1]
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"case": name, "gpus": world, "tokens_per_s_per_gpu": (n1 - n0) / (t1 - t0) / world,
                                      "peak_gpu_gib": peak.item()}), flush=True)


def scale_out_rows():
    import torch
    rows = []
    gpus = 2 if SMOKE else torch.cuda.device_count()
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} if SMOKE else {})}
    for name, keys in SCALE_CASES.items():
        if SMOKE and keys["finetuning_type"] == "qlora":
            print(f"skip {name}: 4-bit storage under FSDP is a GPU path")
            continue
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port", "29611",
                   __file__, str(WORK), str(STEPS), "--scale", name]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name} FAILED:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            continue
        rows.append(json.loads(lines[-1][7:]))
        print(f"{name}: {rows[-1]['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, peak {rows[-1]['peak_gpu_gib']:.1f} GiB")
    return rows


def main():
    if len(sys.argv) > 4 and sys.argv[3] == "--scale":
        run_scale_case(sys.argv[4])
        return
    if len(sys.argv) > 3:
        print("RESULT " + json.dumps(run_mode(sys.argv[3])), flush=True)
        return
    import torch
    start = time.time()
    prepare()
    try:
        import flash_attn  # noqa: F401
        flash = True
    except ImportError:
        flash = False
    rows = []
    for name, (_, attention) in MODES.items():
        if attention == "flash_attention_2" and not flash:
            print(f"skip {name}: flash-attn is not installed")
            continue
        if time.time() - start > 420:
            print(f"skip {name}: out of the 8-minute budget")
            continue
        done = subprocess.run([sys.executable, __file__, str(WORK), str(STEPS), name], capture_output=True, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name} FAILED:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            continue
        rows.append(json.loads(lines[-1][7:]))
        print(f"{name}: {rows[-1]['label_tokens_per_s']:.0f} label tokens/s ({time.time() - start:.0f} s)", flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU smoke run (tiny model)"
    device = f"{gpu}, torch {torch.__version__}, flash-attn {'yes' if flash else 'no'}"
    table = [f"GPU check: {device}; {STEPS} QLoRA steps, batch 8, max length 1024, TinyLlama-1.1B shape",
             "", "| mode | label tokens/s | tokens/s | s/step | padding | peak GPU GiB | mean loss | batching |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        table.append(f"| {r['mode']} | {r['label_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
                     f"{100 * r['padding_fraction']:.0f}% | {r['peak_gpu_gib']:.1f} | {r['loss']:.3f} | {r['batching']} |")
    scale = scale_out_rows() if os.environ.get("SCALE", "1") != "0" else []
    if scale:
        table += ["", f"Scale-out: {scale[0]['gpus']} process(es), batch 4 per process, gradient checkpointing, "
                  f"{'fp32 (CPU smoke)' if SMOKE else 'bf16'}", "",
                  "| case | tokens/s per GPU | peak GPU GiB (max over ranks) |", "|---|---:|---:|"]
        table += [f"| {r['case']} | {r['tokens_per_s_per_gpu']:.0f} | {r['peak_gpu_gib']:.1f} |" for r in scale]
    print("\n".join(table))
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.json").write_text(json.dumps({"device": device, "rows": rows, "scale_out": scale}, indent=2))
        Path(out, "gpu_check.md").write_text("\n".join(table) + "\n")
    print(f"total {time.time() - start:.0f} s")


main()
PY

HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$PYTHON" "$WORK/gpu_check.py" "$WORK" "$STEPS"

[ "${BAICHUAN:-1}" = "0" ] && exit 0
cat > "$WORK/gpu_memory_baichuan.py" <<'PY'
import json, os, subprocess, sys, time
from pathlib import Path

REPO = Path.cwd()
sys.path[:0] = [str(REPO)]
WORK = Path(sys.argv[1])
SMOKE = bool(os.environ.get("SMOKE"))
STEPS = 3
MODEL = {  # Baichuan2-13B-Base's config.json: ALiBi (no max_position_embeddings), NormHead (z_loss_weight)
    "hidden_size": 5120, "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 40,
    "vocab_size": 125696, "model_max_length": 4096, "rms_norm_eps": 1e-6, "z_loss_weight": 0,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
if SMOKE:
    MODEL.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=2000)
DEVICE = "cpu" if SMOKE else "cuda"
FOLDER = WORK / ("baichuan2_13b_smoke" if SMOKE else "baichuan2_13b")


def prepare():
    import torch
    from component.model.baichuan import BaichuanConfig, BaichuanForCausalLM

    if (FOLDER / "config.json").is_file():
        return
    config = BaichuanConfig(**MODEL)
    assert config.use_alibi and config.use_norm_head
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = BaichuanForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(FOLDER)


def run(path, batch):
    import torch
    from datasets import Dataset
    from component.config.training import build_arguments
    from component.data.collators import PaddingCollator
    from component.model.loader import load_model
    from component.train.sft import SFTTrainer

    data = WORK / "unused.jsonl"
    data.write_text('{"kind": "k", "input": "q", "target": "a"}\n')
    args, training_args = build_arguments({
        "model_name_or_path": str(FOLDER), "train_file": str(data), "finetuning_type": "qlora", "lora_rank": 16,
        "lora_alpha": 32, "lora_dropout": 0.05, "output_dir": str(WORK / "out_baichuan"), "max_steps": STEPS,
        "per_device_train_batch_size": batch, "learning_rate": 2e-4, "bf16": not SMOKE, "gradient_checkpointing": True,
        "save_strategy": "no", "report_to": "none", "logits_path": path,
    })
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch * STEPS):  # 1,024 tokens: a 30% prompt, labels on the 70% reply
        ids = torch.randint(3, MODEL["vocab_size"], (1024,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 307 + ids[307:]})
    model = load_model(args, True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=Dataset.from_list(rows),
                         data_collator=PaddingCollator(0, attention_mask=False), logits_path=path,
                         logits_chunk_size=args.logits_chunk_size)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"logits_path": path, "batch": batch, "peak_gpu_gib": peak, "step_s": seconds / STEPS,
            "loss": result.training_loss}


def main():
    if len(sys.argv) > 2:
        print("RESULT " + json.dumps(run(sys.argv[2], int(sys.argv[3]))), flush=True)
        return
    import torch
    start = time.time()
    prepare()
    print(f"model written ({time.time() - start:.0f} s)", flush=True)
    rows = []
    for batch in (1, 4):
        for path in ("chunked", "model"):
            done = subprocess.run([sys.executable, __file__, str(WORK), path, str(batch)], capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode or not lines:  # e.g. out of memory on the model's path: recorded as failed
                tail = (done.stderr or done.stdout)[-600:].replace("\n", " ")
                rows.append({"logits_path": path, "batch": batch, "failed": tail})
                print(f"{path} batch {batch} FAILED: {tail}", flush=True)
                continue
            rows.append(json.loads(lines[-1][7:]))
            print(f"{path} batch {batch}: peak {rows[-1]['peak_gpu_gib']:.2f} GiB ({time.time() - start:.0f} s)", flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU smoke run (tiny model)"
    table = [f"Baichuan2-13B-shaped QLoRA memory: {gpu}, torch {torch.__version__}; 1,024 tokens, {STEPS} steps, "
             "LoRA r16, gradient checkpointing, bf16", "",
             "| batch | logits_path | peak GPU GiB | s/step | mean loss |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        if "failed" in r:
            table.append(f"| {r['batch']} | {r['logits_path']} | failed | - | - |")
        else:
            table.append(f"| {r['batch']} | {r['logits_path']} | {r['peak_gpu_gib']:.2f} | {r['step_s']:.2f} | {r['loss']:.3f} |")
    print("\n".join(table))
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_memory_baichuan.json").write_text(json.dumps(rows, indent=2))
        Path(out, "gpu_memory_baichuan.md").write_text("\n".join(table) + "\n")
    print(f"total {time.time() - start:.0f} s")


main()
PY

HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$PYTHON" "$WORK/gpu_memory_baichuan.py" "$WORK"
