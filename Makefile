# The set-up commands: `make demo` (the offline demo), `make test` (ruff, then the test suite), `make bench` (benchmarks, not part
# of the tests: reads the demo's runs; BENCH_ARGS passes options to benchmarks/run.py), `make bench-full` (the real
# configs' models at their published shapes, random weights: benchmarks/full_size.py; FULL_ARGS passes options, e.g.
# `FULL_ARGS="--device cuda"` on a GPU). All install first.
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: install demo test bench bench-full clean

install:
	VENV=$(VENV) scripts/install.sh

demo: install
	$(BIN)/speechless run -c configs/pipeline/demo.yaml --out $(OUT)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

BENCH_ARGS ?=
bench: install
	$(BIN)/python benchmarks/run.py --stage1 $(OUT)/stage1 --corpus $(OUT)/corpus/all.jsonl --out $(OUT)/bench/results.json $(BENCH_ARGS)

FULL_ARGS ?=
bench-full: install
	$(BIN)/python benchmarks/full_size.py --scale full --out runs/bench/full_size.json $(FULL_ARGS)

clean:
	rm -rf runs
