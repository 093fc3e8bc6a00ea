# make demo: set up, then run the CPU demo end to end.  make test: set up, then run every test.
# make lint: ruff (lint + format check) and import-linter's layer contracts (pyproject.toml).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
DEMO := output/demo

.PHONY: setup demo test lint clean

setup:
	$(PYTHON) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q -r requirements-dev.txt

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

clean:
	rm -rf output .pytest_cache
