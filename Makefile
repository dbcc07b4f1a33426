# Every target creates .venv and installs the project on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
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

# on a CUDA machine: MoE layers in bf16 (torch._grouped_mm on sm90+), the training step with model FLOPs utilisation
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_moe.py --device cuda --peers grouped_mm torchscale
	$(BIN)/python benchmarks/bench_moe.py --device cuda --sweep --plot docs/bench_moe_sweep_gpu.png
	$(BIN)/python benchmarks/bench_train.py --sizes tiny base --batch 256 64 --rounds 10

lint: $(STAMP)
	$(BIN)/python -m ruff check mm_moe tests benchmarks data *.py

clean:
	rm -rf $(VENV) .pytest_cache
