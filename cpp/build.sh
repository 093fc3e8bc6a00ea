#!/usr/bin/env bash
# Build llama.cpp (CPU, Release, static library only) and our programs (llm_chat, llm_logits, llm_bench)
# in a cache folder outside the repository. Re-running reuses the existing build.
#   cpp/build.sh                              # llama.cpp from the llama-cpp-python sdist (pip download)
#   LLAMA_CPP_DIR=/path/to/llama.cpp cpp/build.sh   # an existing llama.cpp checkout instead
# Prints the folder holding the binaries (llm_chat, llm_logits, llm_bench) on stdout.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${LLM_TRAINING_CACHE:-$HOME/.cache/llm_training}/llamacpp"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$CACHE"

if [ -z "${LLAMA_CPP_DIR:-}" ]; then
    SDIST_DIR="$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
    LLAMA_CPP_DIR="$SDIST_DIR/vendor/llama.cpp"
    if [ ! -f "$LLAMA_CPP_DIR/include/llama.h" ]; then
        "${PYTHON:-python3}" -m pip download --no-deps --no-binary :all: \
            -d "$CACHE/download" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
        tar -xzf "$CACHE/download/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$CACHE"
    fi
fi
LLAMA_CPP_DIR="$(cd "$LLAMA_CPP_DIR" && pwd)"
if [ ! -f "$LLAMA_CPP_DIR/include/llama.h" ]; then
    echo "error: LLAMA_CPP_DIR=$LLAMA_CPP_DIR has no include/llama.h (not a llama.cpp checkout)" >&2
    exit 1
fi

# One build folder per llama.cpp source and per checkout of ours (CMake ties a build folder to one source folder),
# so switching either never mixes objects.
BUILD="$CACHE/build-$(printf '%s\n%s' "$LLAMA_CPP_DIR" "$HERE" | md5sum | cut -c1-8)"
# Progress goes to stderr: stdout is only the folder, for LLAMA_CPP_BIN=$(cpp/build.sh).
cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CPP_DIR="$LLAMA_CPP_DIR" >&2
cmake --build "$BUILD" --parallel "$JOBS" --target llm_chat llm_logits llm_bench >&2
echo "$BUILD"
