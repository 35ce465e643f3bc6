# Two commands: `make serve` (the shipped models on :3000) and `make test` (the whole suite); the rest are tools.
# `make check` is the fast tier for every change: ruff and the tests that train, serve and start nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: serve test check test-stress test-images image image-gpu data browser containers promtool default-model explainer-model gpu-suite gpu-parts clean

serve: $(VENV)/.serving
	$(BIN)/python -m model_store register-default
	$(BIN)/bentoml serve --port $(PORT)

test: $(VENV)/.full data browser containers promtool
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

# The fast tier (tests/conftest.py says which tests are heavy, and why): about 2 minutes on 2 cores.
check: $(VENV)/.full data
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not heavy"

# The suite pinned to one core, beside a CPU hog, and as is, then the tests that start, kill or time
# processes 3 more times in each of those; and as another CPU would run it: each other BLAS kernel
# this CPU can run, ONNX Runtime with 1 and 2 threads, PyTorch's baseline x86 kernels
# (tests/stress.py). A check that no test depends on the machine's speed or its CPU's rounding,
# for people rather than CI: several hours on 2 cores; MODES=blas,ort-threads-1 picks some.
test-stress: $(VENV)/.full data browser containers promtool
	$(BIN)/python tests/stress.py $(if $(MODES),--modes $(MODES))

# The container images (deploy/image.py): the bento of the models SERVING_MODELS names (default: the
# shipped two) on a Debian base made from Debian packages, or on BASE_IMAGE (e.g. python:3.11-slim)
# where a registry is reachable; built with podman, or docker (ENGINE=docker to choose).
image: $(VENV)/.serving
	$(BIN)/python -m model_store register-default
	$(BIN)/python -m deploy.image

image-gpu: $(VENV)/.serving
	$(BIN)/python -m model_store register-default
	$(BIN)/python -m deploy.image --gpu

# The GPU image built and inspected (tests/images_gpu.py): 3 GB of CUDA wheels, so not in make test.
test-images: $(VENV)/.full containers
	$(BIN)/python -m pytest tests/images_gpu.py

# Reproduces the shipped model_store/default/fashion-lenet.onnx and the checkpoint it is exported from,
# fashion-lenet.pt (its weights and card: what `python -m training finetune --from fashion-lenet`
# starts from), about 2 minutes on 2 CPU cores. Another CPU's kernels round differently, so a rerun
# gives another graph of the same accuracy, give or take a few tenths of a point.
default-model: $(VENV)/.full data
	$(BIN)/python -m training train --model lenet_bn --model-arg activation=relu --model-arg pool=max \
	  --epochs 12 --seed 0 --output-dir runs/default
	$(BIN)/python -m training.checkpoint runs/default/last.pt model_store/default/fashion-lenet.pt
	$(BIN)/python -m export --checkpoint model_store/default/fashion-lenet.pt --output model_store/default/fashion-lenet.onnx

# Reproduces the shipped model_store/default/fashion-resnet20.onnx, the model /explain answers with:
# ResNet-20 exported with its class-activation map, and its checkpoint beside it (about 16 minutes on
# 2 CPU cores, as README says).
explainer-model: $(VENV)/.full data
	$(BIN)/python -m training train --model resnet20 --epochs 12 --batch-size 128 --opt sgd --lr 0.1 --nesterov \
	  --weight-decay 5e-4 --lr-scheduler onecycle --random-crop-padding 2 --hflip --channels-last --seed 0 \
	  --output-dir runs/explainer
	$(BIN)/python -m training.checkpoint runs/explainer/last.pt model_store/default/fashion-resnet20.pt
	$(BIN)/python -m export --checkpoint model_store/default/fashion-resnet20.pt --cam --output model_store/default/fashion-resnet20.onnx

# On a GPU machine: every textbook row trained, exported, verified, timed and served
# (benchmarks/gpu/suite.py); CI runs the same sequence with --smoke on the CPU.
gpu-suite:
	$(PYTHON) -m benchmarks.gpu.suite --out gpu-results $(if $(DATA_DIR),--data-dir $(DATA_DIR))

# What a GPU lease carries, made here (where the package registry is), into .gpu/ (ignored by git):
# onnxruntime-gpu in parts of 60 MiB, one folder each (a device call carries at most 64 MiB with the
# repository), the Fashion-MNIST files, and the serving wheels the GPU machines lack. It ends with
# the device calls to make (benchmarks/gpu/suite.py's docstring says why each).
GPU_WHEEL := onnxruntime-gpu==1.31.1
# pip matches platform tags exactly: name each glibc a wheel may be built for, up to the GPU image's (2.39).
GPU_PIP := --only-binary=:all: --python-version 3.12 --implementation cp \
  $(foreach v,39 35 34 31 28 27 26 24 17,--platform manylinux_2_$(v)_x86_64) --platform manylinux2014_x86_64
gpu-parts: data
	rm -rf .gpu/parts .gpu/split .gpu/data .gpu/site
	$(BIN)/python -m pip download --quiet --no-deps $(GPU_PIP) -d .gpu/wheels $(GPU_WHEEL)
	$(BIN)/python -m benchmarks.gpu.wheel_parts split .gpu/wheels/onnxruntime_gpu-1.31.1-*.whl --out .gpu/split --part-mb 60
	cd .gpu/split && for part in *.part[0-9]*; do mkdir -p ../parts/$${part##*.part} && mv $$part ../parts/$${part##*.part}/; done
	mv .gpu/split/*.parts.json .gpu/parts/$$(ls .gpu/parts | tail -1)/ && rmdir .gpu/split
	mkdir -p .gpu/data && cp $(FASHION_MNIST)/*-ubyte.gz .gpu/data/
	$(BIN)/python -m pip download --quiet --no-deps $(GPU_PIP) -d .gpu/site -r benchmarks/gpu/serving_requirements.txt
	@du -sh .gpu/parts/* .gpu/data .gpu/site
	@last=$$(ls .gpu/parts | tail -1); for nn in $$(ls .gpu/parts); do [ $$nn = $$last ] && break; \
	  echo "device run, carry [\".gpu/parts/$$nn\"]: mkdir -p /tmp/parts && cp .gpu/parts/$$nn/* /tmp/parts/ && ls -l /tmp/parts"; done; \
	  echo "device run, carry [\".gpu/parts/$$last\", \".gpu/data\", \".gpu/site\"], timeout_s 600: sh benchmarks/gpu/launch.sh"; \
	  echo "each within 30 s of the previous answer: the machine stays warm 30 s, and /tmp/parts with it"

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

# A container engine and what makes the base image, the same way: podman with runc, and mmdebstrap.
containers:
	@if command -v podman >/dev/null && command -v mmdebstrap >/dev/null; then :; \
	elif docker info >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null; \
	else echo "note: no container engine; run 'sudo apt-get install podman runc mmdebstrap' (or start docker)"; fi

# Prometheus's promtool, which runs deploy/prometheus-rules.yaml in tests/test_drift.py, the same way.
promtool:
	@if command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else echo "note: promtool is missing; run 'sudo apt-get install prometheus'"; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
