# Set-up, tests and the demo. Everything runs from the virtualenv .venv in the repo root.
PYTHON ?= python3
# Built Horovod wheels, kept outside the checkout so that fresh clones on this machine reuse them.
WHEELS ?= $(HOME)/.cache/imagenet-k8s-trainer/wheels
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := demo-data

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml deploy/horovod/build-wheel.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,s3,gcs,cpu]'
	$(BIN)/pip install --quiet "$$(deploy/horovod/build-wheel.sh $(BIN)/python $(WHEELS))"
	touch $@

test: setup
	$(BIN)/ruff check ingest bench tests
	$(BIN)/python -m pytest

# Synthesise a small TinyImageNet-layout data set (with real-data quirks), shard it, verify it.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/python -m ingest.synth --output $(DEMO)/tiny-imagenet-200 --classes 10 \
		--train-per-class 100 --val-per-class 20 --quirks
	$(BIN)/python -m ingest.shard --input $(DEMO)/tiny-imagenet-200 --output $(DEMO)/shards --shard-size 200
	$(BIN)/python -m ingest.verify $(DEMO)/shards

bench: setup
	$(BIN)/python -m bench.ingest

clean:
	rm -rf $(DEMO) bench-data
