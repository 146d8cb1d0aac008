# Everything a fresh machine needs: `make demo` runs the main job, `make test` runs the test suite.
# Both create the virtual environment at .venv and install what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
LOCALE_TEXT := /usr/share/locale/zh_CN/LC_MESSAGES/iso_3166-1.mo
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
# glibc >= 2.35 (ignored elsewhere): back malloc's large blocks with transparent huge pages. XLA:CPU allocates its
# per-step buffers with malloc, and on 4 KiB pages each step pays TLB misses and page faults again: the CLIP job took
# 16.4M minor faults per 200 steps and ran 1.17x slower (1095 instead of 1280 pairs/s), the ViT step 1.75x slower.
# mmjax train / eval set it themselves when it is unset (mmjax/cli.py); set it to '' to disable.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: setup data demo test lint bench clean

setup: $(STAMP) data

# torch==2.13.0 first: it is the CPU wheel these machines carry; anything else would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps open_clip_torch==3.3.0  # the CLIP tokenizer's reference (see pyproject.toml)
	touch $@

# The embedded default dataset (Debian package dataset-fashion-mnist), and real text in ~150 languages for the
# tokenizer's parity test (the translations of the Debian package iso-codes).
data: $(FMNIST) $(LOCALE_TEXT)
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist
$(LOCALE_TEXT):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq iso-codes

demo: setup
	$(BIN)/python -m mmjax train --config experiments/clip_fashion_mnist.py --workdir $(WORKDIR)

test: setup lint
	$(BIN)/python -m pytest -n 2 -q --doctest-modules $(PYTEST_ARGS) mmjax tests

# One style (ruff format) and a linter (ruff check), both configured in pyproject.toml.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Every benchmark, each side in a process of its own (about 40 minutes here; run it on an idle machine):
# docs/results/benchmarks.json and benchmarks.png.
bench: setup
	$(BIN)/python experiments/bench_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
