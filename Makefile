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
COMMA := ,
SHELL := /bin/bash
EXTRAS ?= dev,server,triton,rtx
FORCE ?=
# pytest-xdist workers for `make test` (files stay whole on one worker: module-scoped servers).
TEST_WORKERS ?= 2
SD35 := $(BIN)/sd35trt
STAGE_ARGS = --config $(CONFIG) --run-dir $(RUN_DIR) $(if $(FORCE),--force,)
# The build backend (auto | tensorrt | tensorrt-rtx | onnxruntime); empty: the config's build.backend.
BACKEND ?=

.PHONY: setup setup-unlocked lock test-latest readme-figures test test-rtx rtx-fullsize test-gpu lint format calibrate export build run all reference bench eval serve serve-throughput triton triton-serve triton-throughput artifact gpu-wheels gpu-evidence clean

# The CPU development environment is locked (requirements.lock: every package pinned with its
# sha256). `make setup` installs exactly that; `make lock` regenerates it from pyproject's ranges.
LOCK ?= requirements.lock
UV_SPEC ?= uv==0.13.8
SETUP_STAMP := $(VENV)/.sd35trt-setup

# The Triton Python-backend environment, $(VENV)/triton-backend (sd35trt/triton/local.py says why):
# nvidia-pytriton (tritonserver + Python backend) and numpy<2 for its backend stub, pinned with
# hashes in requirements-triton.lock and installed without dependencies; a .pth file then adds
# the project environment after them (sd35trt, torch, ONNX Runtime).
TRITON_LOCK ?= requirements-triton.lock
define triton-env
	$(1)/bin/python -m venv --without-pip --clear $(1)/triton-backend
	$(1)/bin/pip --python $(1)/triton-backend/bin/python install -q --require-hashes --no-deps -r $(TRITON_LOCK)
	$(1)/bin/python -m sd35trt.triton.local link $(1)/triton-backend
endef

setup: $(SETUP_STAMP)

$(SETUP_STAMP): $(LOCK) $(TRITON_LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	$(call triton-env,$(VENV))
	$(SD35) --help > /dev/null
	@touch $@
	@echo "setup done (locked): source $(VENV)/bin/activate"

# GPU machines (no lock: the CUDA build of torch and TensorRT come from the user's own index):
#   make setup-unlocked TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" EXTRAS=dev,server,gpu,tensorrt
setup-unlocked:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(call triton-env,$(VENV))
	$(SD35) --help > /dev/null && touch $(SETUP_STAMP) && echo "setup done (unlocked): source $(VENV)/bin/activate"

# Regenerate the lock from pyproject's ranges (newest allowed versions, CPU torch pinned).
lock:
	$(PYTHON) -m venv $(VENV)-tools
	$(VENV)-tools/bin/pip install -q $(UV_SPEC)
	$(VENV)-tools/bin/uv pip compile pyproject.toml --extra $(subst $(COMMA), --extra ,$(EXTRAS)) \
		--constraint requirements-torch.txt --python-version 3.11 --generate-hashes --upgrade \
		$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),) --no-header --quiet -o $(LOCK)
	$(VENV)-tools/bin/uv pip compile requirements-triton.in --no-deps --python-version 3.11 \
		--generate-hashes --upgrade --no-header --quiet -o $(TRITON_LOCK)
	@echo "wrote $(LOCK): $$(grep -c '==' $(LOCK)) packages pinned; $(TRITON_LOCK): $$(grep -c '==' $(TRITON_LOCK))"

# The newest versions pyproject allows, in a separate venv: shows upstream drift early. Not the CI gate.
LATEST_VENV ?= .venv-latest
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade $(TORCH_SPEC) -e ".[$(EXTRAS)]"
	$(call triton-env,$(LATEST_VENV))
	$(LATEST_VENV)/bin/pip freeze --exclude-editable | diff <(grep -Eo '^[A-Za-z0-9_.-]+==[^ ]+' $(LOCK)) - || true
	$(LATEST_VENV)/bin/python -m pytest -q

test: $(SETUP_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not tensorrt_rtx"

# Real TensorRT-RTX builds on this machine (no GPU needed): the marked tests, then the tiny model
# built for real and its FP8 proof checked (`inspect`: every quantized MatMul inside an FP8 GEMM).
RTX_RUN_DIR ?= runs/ci-rtx
FP8_PROOF := every quantized MatMul is inside an FP8 GEMM
test-rtx: $(SETUP_STAMP)
	$(BIN)/python -m pytest -q -n 0 -m tensorrt_rtx
	$(MAKE) build MODEL=tiny BACKEND=tensorrt-rtx RUN_DIR=$(RTX_RUN_DIR)
	$(SD35) inspect $(RTX_RUN_DIR) | tee $(RTX_RUN_DIR)/inspect.txt | grep -F "FP8 proof"
	grep -qF "$(FP8_PROOF)" $(RTX_RUN_DIR)/inspect.txt

# Full-size evidence on a CPU machine: the FP8 transformer (random weights, published shapes)
# exported and built with TensorRT-RTX; prints and writes a table (scripts/rtx_fullsize.py).
# Needs about 12 GB of RAM at sd3.5-medium size; FULLSIZE_LOCK=path serializes such runs.
FULLSIZE_LOCK ?=
rtx-fullsize: $(SETUP_STAMP)
	$(if $(FULLSIZE_LOCK),flock $(FULLSIZE_LOCK),) $(BIN)/python scripts/rtx_fullsize.py --config $(CONFIG)

test-gpu:
	$(BIN)/python -m pytest -q -m "gpu or tensorrt" tests/gpu

lint: $(SETUP_STAMP)
	$(BIN)/ruff check sd35trt tests scripts
	$(BIN)/ruff format --check sd35trt tests scripts

format:
	$(BIN)/ruff check --fix sd35trt tests scripts
	$(BIN)/ruff format sd35trt tests scripts

calibrate: $(SETUP_STAMP)
	$(SD35) calibrate $(STAGE_ARGS)

export: calibrate
	$(SD35) export $(STAGE_ARGS)

build: export
	$(SD35) build $(STAGE_ARGS) $(if $(BACKEND),--backend $(BACKEND),)

run: build
	$(SD35) run --engines $(RUN_DIR)/engines "$(PROMPT)" -o $(RUN_DIR)/images/out.png

# The README's measured figures, regenerated from the tiny FP8 and FP32 engines.
readme-figures: build
	$(MAKE) build MODEL=tiny-fp32
	$(BIN)/python scripts/readme_figures.py --write README.md

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

# A Triton model repository for the engines (copied in), and Triton vs `sd35trt serve` throughput.
TRITON_REPO ?= $(RUN_DIR)/triton

triton: build
	$(SD35) triton $(RUN_DIR)/engines --out $(TRITON_REPO) --force

# Serve that repository with the local tritonserver (make setup installs it) until Ctrl-C.
triton-serve: triton
	$(SD35) triton serve $(TRITON_REPO) --host $(HOST) --http-port $(PORT)

triton-throughput: build
	$(BIN)/python scripts/triton_throughput.py $(RUN_DIR)/engines

ARTIFACT ?= $(RUN_DIR)/sd35trt-$(MODEL).tar.gz

artifact: build
	$(SD35) package $(RUN_DIR) --out $(ARTIFACT)
	$(SD35) verify $(ARTIFACT)

# Full-size evidence on a CUDA GPU (README: "Evidence at full size on a GPU"): SD3.5-large and
# -medium shaped transformer forward, calibration and FP8 export, each step bounded, in one run.
# gpu-wheels downloads into .whl/ what a bare GPU machine lacks (scripts/gpu_device_packages.txt).
GPU_EVIDENCE_ARGS ?=
GPU_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

gpu-wheels: $(SETUP_STAMP)
	$(BIN)/python scripts/gpu_wheels.py

gpu-evidence:
	PYTHON=$(GPU_PYTHON) scripts/gpu_evidence.sh $(GPU_EVIDENCE_ARGS)

clean:
	rm -rf $(RUN_DIR)
