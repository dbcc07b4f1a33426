# Every target creates .venv and installs the project on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]" -c constraints.txt
	# test-only peer (its pins, timm==0.6.13, would clash with ours): torchscale's BEiT3 is the reference forward
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation fairscale==0.4.0 torchscale==0.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_moe.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_decode.py

# on a CUDA machine, about 10 minutes: MoE layers and the base-width pretraining step, eager and compiled side by
# side (bf16; MFU, GPU-busy share, host syncs); report and compile cache in runs/bench_gpu/
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py --out runs/bench_gpu

lint: $(STAMP)
	$(BIN)/python -m ruff check mm_moe tests benchmarks data *.py

clean:
	rm -rf $(VENV) .pytest_cache
