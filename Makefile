# Set-up, tests and the demo. Everything runs from the virtualenv .venv in the repo root.
PYTHON ?= python3
# Built Horovod wheels, kept outside the checkout so that fresh clones on this machine reuse them.
WHEELS ?= $(HOME)/.cache/imagenet-k8s-trainer/wheels
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := demo-data

.PHONY: setup test demo bench audit clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml deploy/horovod/build-wheel.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,s3,gcs,cpu]'
	$(BIN)/pip install --quiet "$$(deploy/horovod/build-wheel.sh $(BIN)/python $(WHEELS))"
	touch $@

# TypeScript and Grafana's dashboard types (tests/grafana_schema/package-lock.json), for the tests only: the
# demo needs no Node.js.
SCHEMA := tests/grafana_schema
$(SCHEMA)/node_modules/.installed: $(SCHEMA)/package.json $(SCHEMA)/package-lock.json
	npm ci --prefix $(SCHEMA) --no-audit --no-fund --loglevel=error >/dev/null
	touch $@

test: setup $(SCHEMA)/node_modules/.installed
	$(BIN)/ruff check ingest trainer bench deploy tests
	$(BIN)/python -m pytest

# End to end on this machine: synthesise a small TinyImageNet-layout set (with real-data quirks),
# shard it, verify it, train the seed's Model 1 on 2 Horovod workers (two local "pods" of the project's
# launcher, as on Kubernetes, rendezvous on 127.0.0.1:$(RENDEZVOUS_PORT)) serving Prometheus metrics on
# 127.0.0.1:$(METRICS_PORT) and +1 (deploy/prometheus/prometheus.yml scrapes them), print its row of the
# study's table (trainer.report), where its learning curves are and how to open it in TensorBoard.
METRICS_PORT ?= 9400
RENDEZVOUS_PORT ?= 29500
demo: setup
	rm -rf $(DEMO)
	$(BIN)/python -m ingest.synth --output $(DEMO)/tiny-imagenet-200 --classes 10 \
		--train-per-class 200 --val-per-class 20 --quirks
	$(BIN)/python -m ingest.shard --input $(DEMO)/tiny-imagenet-200 --output $(DEMO)/shards --shard-size 200
	$(BIN)/python -m ingest.verify $(DEMO)/shards
	$(BIN)/python -m trainer.launch --local-pods 2 --port $(RENDEZVOUS_PORT) -- \
		$(BIN)/python -m trainer.train --data $(DEMO)/shards --output $(DEMO)/run --preset seed-model1-aug --epochs 6 --batch-size 32 --lr 0.002 --log-level WARNING \
		--metrics-port $(METRICS_PORT)
	$(BIN)/python -m trainer.report $(DEMO)/run
	@echo "learning curves: $(DEMO)/run/curves.png"
	@echo "TensorBoard:     $(BIN)/tensorboard --logdir $(DEMO)/run/tensorboard"

# The input pipeline runs on a 30,000-image 64 px set in bench-data/ (docs/benchmarks.md has the rest).
bench: setup
	$(BIN)/python -m bench.ingest
	rm -rf bench-data
	$(BIN)/python -m ingest.synth --output bench-data/tiny --classes 100 --train-per-class 300 --val-per-class 2
	$(BIN)/python -m ingest.shard --input bench-data/tiny --output bench-data/shards --processes 2
	$(BIN)/python -m bench.pipeline --data bench-data/shards
	$(BIN)/python -m bench.train --models model2

# Known vulnerabilities of every installed distribution; accepted ones: deploy/audit/accepted.txt. pip-audit
# --strict fails unless it audited everything; where its services are out of reach (PyPI's per-version API,
# OSV), PyPI's package-level advisories stand in (docs/reliability.md, "Dependency audit").
ACCEPTED = $(shell sed -n 's/^\([A-Z][A-Za-z0-9-]*\) .*/--ignore-vuln \1/p' deploy/audit/accepted.txt)
audit: setup
	$(BIN)/pip-audit --strict --progress-spinner off $(ACCEPTED) || { \
		echo "pip-audit could not audit everything here: PyPI's package-level advisories instead"; \
		$(BIN)/python deploy/audit/pypi_advisories.py --accept deploy/audit/accepted.txt; }

clean:
	rm -rf $(DEMO) bench-data
