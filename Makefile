# make demo: set up, then run the CPU demo end to end.  make test: set up, then run every test.
# make lint: ruff (lint + format check) and import-linter's layer contracts (pyproject.toml).
# make web-screenshots: rerun the browser test of generate.py web, saving docs/images/web_{chat,compare}.png.
# make vllm-env [VLLM_VENV=DIR]: vLLM's own environment with our plugin (default .venv-vllm, git-ignored).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
DEMO := output/demo
VLLM_VENV ?= .venv-vllm

.PHONY: setup chromium demo test lint web-screenshots clean check-llamacpp vllm-env check-vllm

setup: chromium
	$(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q -r requirements-dev.txt

# Debian's Chromium (+ a CJK font for the screenshots) for the browser test; Playwright never downloads one.
chromium:
	@test -x /usr/bin/chromium || [ "$$(id -u)" != 0 ] || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-wqy-microhei; }
	@test -x /usr/bin/chromium || echo "no /usr/bin/chromium (apt-get install chromium as root): tests/inference/test_web.py will skip"

demo: setup
	$(PYTHON) -m component.demo_assets model config/demo/model/config.json $(DEMO)/base_model
	$(PYTHON) train_sft.py --train_args_file config/demo/sft_lora.json
	$(PYTHON) train_rm.py --train_args_file config/demo/rm_lora.json
	$(PYTHON) train_dpo.py --train_args_file config/dpo/demo_lora.json
	$(PYTHON) train_sft.py --train_args_file config/demo/sft_lora.json --output_dir $(DEMO)/sft_short \
		--max_steps 80 --warmup_steps 10 --eval_strategy no --save_strategy no
	$(PYTHON) train_rlhf.py --train_args_file config/rlhf/demo_grpo.json
	$(PYTHON) generate.py compare --config config/demo/compare.json

test: setup
	$(PYTHON) -m pytest -q

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	lint-imports

web-screenshots: setup
	WEB_SCREENSHOT_DIR=docs/images $(PYTHON) -m pytest -q tests/inference/test_web.py

# Opt-in, not in CI: build llama.cpp + cpp/ (cpp/build.sh, cached outside the repo), then check our GGUF files in it.
check-llamacpp:
	LLAMA_CPP_BIN="$$(cpp/build.sh)" $(PYTHON) -m pytest -q -s -rs tests/export/test_llamacpp.py

# vLLM in an environment of its own (requirements-vllm.txt: it needs an older transformers), with vllm_plugin/
# installed; vllm_plugin/make_env.sh prints how to use it. docs/export.md#serving.
vllm-env:
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) vllm_plugin/make_env.sh $(VLLM_VENV)

# Opt-in, not in CI: our exports served by vLLM (offline, LoRA, the OpenAI-compatible server) against generate.py.
check-vllm: vllm-env
	VLLM_VENV="$(abspath $(VLLM_VENV))" $(PYTHON) -m pytest -q -s -rs tests/serving

clean:
	rm -rf output .pytest_cache
