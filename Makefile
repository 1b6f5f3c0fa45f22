# sd35trt: `make setup test`, then `make calibrate export build run` (MODEL=tiny by default).
# Stages are chained through runs/$(MODEL)/manifest.json, not file times: each stage checks its
# upstream records and does nothing when its own record is fresh (FORCE=1 rebuilds).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= tiny
CONFIG ?= configs/$(MODEL).yaml
RUN_DIR ?= runs/$(MODEL)
PROMPT ?= a photo of a cat
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,server
FORCE ?=
SD35 := $(BIN)/sd35trt
STAGE_ARGS = --config $(CONFIG) --run-dir $(RUN_DIR) $(if $(FORCE),--force,)

.PHONY: setup test test-gpu lint format calibrate export build run all reference bench eval serve serve-throughput artifact clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch pinned first (an unpinned torch pulls GBs of CUDA wheels); GPU users:
	# make setup TORCH_SPEC="torch==2.x.y --index-url https://download.pytorch.org/whl/cu128" EXTRAS=dev,server,gpu,tensorrt
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(SD35) --help > /dev/null && echo "setup done: source $(VENV)/bin/activate"

test:
	$(BIN)/python -m pytest -q

test-gpu:
	$(BIN)/python -m pytest -q -m "gpu or tensorrt" tests/gpu

lint:
	$(BIN)/ruff check sd35trt tests scripts
	$(BIN)/ruff format --check sd35trt tests scripts

format:
	$(BIN)/ruff check --fix sd35trt tests scripts
	$(BIN)/ruff format sd35trt tests scripts

calibrate:
	$(SD35) calibrate $(STAGE_ARGS)

export: calibrate
	$(SD35) export $(STAGE_ARGS)

build: export
	$(SD35) build $(STAGE_ARGS)

run: build
	$(SD35) run --engines $(RUN_DIR)/engines "$(PROMPT)" -o $(RUN_DIR)/images/out.png

all: run

reference:
	$(SD35) reference --config $(CONFIG) --run-dir $(RUN_DIR) "$(PROMPT)" -o $(RUN_DIR)/images/reference.png

# The non-quantized reference for bench/eval: the run's own model dir (tiny, random) or model.path.
REFERENCE ?= $(RUN_DIR)/model

bench: build
	$(SD35) bench --engines $(RUN_DIR)/engines $(if $(REFERENCE),--reference $(REFERENCE),) --out $(RUN_DIR)/bench $(BENCH_ARGS)

eval: build
	$(SD35) eval --engines $(RUN_DIR)/engines --reference $(REFERENCE) --prompts calibration_prompts/heldout.txt --out $(RUN_DIR)/eval $(EVAL_ARGS)

HOST ?= 127.0.0.1
PORT ?= 8000

serve: build
	$(SD35) serve --engines $(RUN_DIR)/engines --host $(HOST) --port $(PORT)

serve-throughput: build
	$(BIN)/python scripts/serve_throughput.py $(RUN_DIR)/engines

ARTIFACT ?= $(RUN_DIR)/sd35trt-$(MODEL).tar.gz

artifact: build
	$(SD35) package $(RUN_DIR) --out $(ARTIFACT)
	$(SD35) verify $(ARTIFACT)

clean:
	rm -rf $(RUN_DIR)
