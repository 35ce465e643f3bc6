# Two commands: `make serve` (serve the shipped model on :3000) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: serve test data browser default-model gpu-suite clean

serve: $(VENV)/.serving
	$(BIN)/python -m model_store register-default
	$(BIN)/bentoml serve --port $(PORT)

test: $(VENV)/.full data browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# Reproduces the shipped model_store/default/fashion-lenet.onnx (about 2 minutes on 2 CPU cores).
default-model: $(VENV)/.full data
	$(BIN)/python -m training train --model lenet_bn --model-arg activation=relu --model-arg pool=max \
	  --epochs 12 --seed 0 --output-dir runs/default
	$(BIN)/python -m export --checkpoint runs/default/last.pt --output model_store/default/fashion-lenet.onnx

# On a GPU machine: every textbook row trained, exported, verified and timed (benchmarks/gpu_suite.py);
# CI runs the same sequence with --smoke on the CPU.
gpu-suite:
	$(PYTHON) benchmarks/gpu_suite.py --out gpu-results $(if $(DATA_DIR),--data-dir $(DATA_DIR))

# The serving install is torch-free and quick; the full one adds training, export and test tools.
$(VENV)/.serving: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.full: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[train,test]'
	touch $@ $(VENV)/.serving

# Real Fashion-MNIST from Debian's package when we can install it; otherwise training falls back to
# torchvision's downloader, and --data-dir points anywhere else.
data:
	@if [ -f $(FASHION_MNIST)/t10k-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "note: $(FASHION_MNIST) is missing; run 'sudo apt-get install dataset-fashion-mnist'"; fi

# Headless Chromium and its driver for tests/test_ui_browser.py (the /ui page in a real browser), the
# same way; Debian's pair matches, so Selenium never downloads a driver.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: /usr/bin/chromium or /usr/bin/chromedriver is missing; run 'sudo apt-get install chromium chromium-driver'"; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
