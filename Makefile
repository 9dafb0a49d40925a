# The two set-up commands: `make demo` (the offline demo) and `make test` (the test suite). Both install first.
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: install demo test clean

install:
	VENV=$(VENV) scripts/install.sh

demo: install
	$(BIN)/speechless data synth -c configs/data/demo_synth.yaml --out $(OUT)/corpus
	$(BIN)/speechless stage1 train -c configs/stage1/demo.yaml --set run.out_dir=$(OUT)/stage1 --set data.manifest=$(OUT)/corpus/all.jsonl --push
	$(BIN)/speechless tokenize audio --tokenizer stage1@latest --manifest $(OUT)/corpus/all.jsonl --split test --output $(OUT)/test_tokens.jsonl

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs
