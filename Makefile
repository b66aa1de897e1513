# The README's two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: env demo test test-slow clean

env:
	@bash scripts/setup-env.sh

# Export the embedded tiny model at fp16, validated against PyTorch, then embed with the runtime.
demo: env
	$(BIN)/bgevl-export --model tiny --precision fp16 --output out/tiny-fp16 --overwrite
	$(BIN)/python -m bgevl.runtime.demo out/tiny-fp16

test: env
	$(BIN)/python -m pytest -q

# Full-size ViT-B/16 and ViT-L/14 and full-width LLaVA-NeXT architectures, random weights (minutes, GBs of RAM).
test-slow: env
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf out .pytest_cache
