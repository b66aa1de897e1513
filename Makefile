# The README's two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: env demo test test-slow gpu-check clean

env:
	@bash scripts/setup-env.sh

# Export the embedded tiny model at fp16, validated against PyTorch, then embed with the runtime.
demo: env
	$(BIN)/bgevl-export --model tiny --precision fp16 --output out/tiny-fp16 --overwrite
	$(BIN)/python -m bgevl.runtime.demo out/tiny-fp16

test: env
	$(BIN)/python -m pytest -q --durations=15

# Full-size ViT-B/16 and ViT-L/14 and full-width LLaVA-NeXT architectures, random weights (minutes, GBs of RAM).
test-slow: env
	$(BIN)/python -m pytest -q -m slow

# On a machine with an NVIDIA GPU (no network needed; WHEELS=DIR holds the TensorRT, cuda-python and onnxruntime-gpu
# wheels): gpu-marked tests, fp16/int8/fp8 engines of BGE-VL-base's architecture, bgevl-bench on CUDA/TensorRT,
# all in one results folder (RESULTS=DIR). Without a GPU it stops at once saying so.
gpu-check:
	@PYTHON=$(BIN)/python bash scripts/gpu-check.sh

clean:
	rm -rf out .pytest_cache
