# make demo: set up, then run the CPU demo end to end.  make test: set up, then run every test.
# make lint: ruff (lint + format check) and import-linter's layer contracts (pyproject.toml).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
DEMO := output/demo

.PHONY: setup demo test lint clean check-llamacpp

setup:
	$(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q -r requirements-dev.txt

demo: setup
	$(PYTHON) -m component.demo_assets model config/demo/model/config.json $(DEMO)/base_model
	$(PYTHON) train_sft.py --train_args_file config/demo/sft_lora.json
	$(PYTHON) train_rm.py --train_args_file config/demo/rm_lora.json
	$(PYTHON) train_dpo.py --train_args_file config/dpo/demo_lora.json
	$(PYTHON) generate.py compare --config config/demo/compare.json

test: setup
	$(PYTHON) -m pytest -q

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	lint-imports

# Opt-in, not in CI: build llama.cpp + cpp/ (cpp/build.sh, cached outside the repo), then check our GGUF files in it.
check-llamacpp:
	LLAMA_CPP_BIN="$$(cpp/build.sh)" $(PYTHON) -m pytest -q -s -rs tests/export/test_llamacpp.py

clean:
	rm -rf output .pytest_cache
