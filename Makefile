# The two commands of the README: `make demo` (the main job) and `make test`. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint clients

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0  # the CPU build first, exactly this version
	$(BIN)/python -m pip install -q -e ".[full,dev]"
	touch $@

# The newcomer's demo: export the embedded model to ONNX, make a calibration set from the synthetic
# prompts, quantize to int8 (static QDQ), then validate against PyTorch and print where the report is.
DEMO := demo-out
demo: install
	$(BIN)/instaflow-edge export --target onnx --out $(DEMO)/tiny-onnx-fp32 --overwrite
	$(BIN)/instaflow-edge calibrate --prompts synthetic --limit 64 --out $(DEMO)/calibration --overwrite
	$(BIN)/instaflow-edge quantize --bundle $(DEMO)/tiny-onnx-fp32 --method int8-static \
		--calibration $(DEMO)/calibration --out $(DEMO)/tiny-onnx-int8 --overwrite
	$(BIN)/instaflow-edge validate --bundle $(DEMO)/tiny-onnx-int8 --report $(DEMO)/report

# optimum-onnx, optimum-intel: each in its own venv under .client-venvs (tests/test_clients.py)
clients:
	bash clients/build_venvs.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# everything (what CI runs); test-fast leaves out the tests marked slow, for daily work. Two
# pytest-xdist workers, each test to the first idle one: 19-24 min instead of 31 on 2 cores (much of a
# test is single-threaded Python: imports, tracing, conversion)
PYTEST := $(BIN)/python -m pytest -n 2 --dist worksteal

test: lint
	$(PYTEST)

test-fast: lint
	$(PYTEST) -m "not slow"
