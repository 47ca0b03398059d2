#!/usr/bin/env bash
# The GPU benchmark (issue 9) on a machine with a CUDA GPU and no network: bench/README-gpu.md.
#
#   make gpu-assets        # here, once: .device/ (wheels, tokenizer, SQuAD text)
#   bash bench/gpu.sh      # there, from a copy of the working tree with .device/ carried
#
# Installs the carried wheels and kvcompile itself into $SITE (the system's site-packages are left
# alone), runs bench/gpu.py (Llama-3.1-8B shape, 32k then 100k tokens), then the CUDA test modules
# (tests/test_*cuda*.py). Everything printed goes to $OUT/gpu.log too; gpu.json and gpu.md are
# written to docs/benchmarks/gpu/ and copied to $OUT. Environment knobs:
#   OUT              where results go (the device tool sets it; default out/gpu)
#   BENCH_ARGS       extra arguments for bench/gpu.py, e.g. "--tokens 32768"
#   BENCH_BUDGET_S   bench/gpu.py --budget-s (default 280): sizes and phases that would overrun it are skipped
#   BENCH_TIMEOUT_S  hard limit for bench/gpu.py (default BENCH_BUDGET_S + 45)
#   TEST_TIMEOUT_S   hard limit for the CUDA tests (default 120; 0 skips them)
# With the defaults the whole script ends within about 7.5 minutes (device tool: timeout_s=480).
#   PYTHON           the interpreter (default python3)   SITE   install folder (default /tmp/kvcompile-site)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
if [ -z "${_KVC_GPU_TEED:-}" ]; then  # run again with all output teed into $OUT/gpu.log
  _KVC_GPU_TEED=1 bash "$0" "$@" 2>&1 | tee -a "$OUT/gpu.log"
  exit "${PIPESTATUS[0]}"
fi

DEVICE_DIR=${DEVICE_DIR:-.device}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/kvcompile-site}
RESULTS=docs/benchmarks/gpu
BUDGET=${BENCH_BUDGET_S:-280}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
step() { echo "== $(date +%H:%M:%S) $*"; }
copy_results() { cp -f "$RESULTS/gpu.json" "$RESULTS/gpu.md" "$OUT/" 2>/dev/null || true; }
trap copy_results EXIT

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
$PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.cuda.is_available(), '| transformers', transformers.__version__)" || exit 2
[ -d "$DEVICE_DIR/tokenizer" ] && [ -f "$DEVICE_DIR/squad.txt" ] || {
  echo "no $DEVICE_DIR/tokenizer or $DEVICE_DIR/squad.txt: run 'make gpu-assets' here and carry $DEVICE_DIR"; exit 2; }

step "wheels -> $SITE"
rm -rf "$SITE" && mkdir -p "$SITE"
if ls "$DEVICE_DIR"/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$DEVICE_DIR"/whl/*.whl || exit 3
fi

step "kvcompile -> $SITE"
# A real install, so that kernels/ becomes kvcompile.kernels (setuptools package-dir in pyproject.toml).
# PYTHONSAFEPATH keeps the checkout off sys.path: ./kvcompile would otherwise shadow it, without its kernels.
rm -rf build  # setuptools would pick up stale files from an earlier call's build/lib
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target "$SITE" . ; then
  echo "pip could not install the checkout: copying pyproject.toml's package layout instead"
  rm -rf "$SITE/kvcompile" && cp -r kvcompile "$SITE/kvcompile" && rm -rf "$SITE/kvcompile/kernels" \
    "$SITE/kvcompile/recipes" && cp -r kernels "$SITE/kvcompile/kernels" && cp -r recipes "$SITE/kvcompile/recipes"
fi
export PYTHONPATH="$SITE" PYTHONSAFEPATH=1
$PY -c "import kvcompile, kvcompile.pipeline, kvcompile.session, kvcompile.pack
print('kvcompile', kvcompile.__version__, 'from', kvcompile.__file__)" || exit 4
$PY -c "import kvcompile.kernels" || echo "warning: kvcompile.kernels does not import"

# The default model's tokenizer for the tests' make_tiny_model, without the GGUF wheel: named by
# KVCOMPILE_TEST_TOKENIZER (tests/test_cuda.py), and placed where kvcompile looks for the converted default model.
export KVCOMPILE_TEST_TOKENIZER="$PWD/$DEVICE_DIR/tokenizer"
export KVCOMPILE_CACHE=${KVCOMPILE_CACHE:-/tmp/kvcompile-cache}
if [ -f "$DEVICE_DIR/default-model-cache-dir" ]; then
  dir="$KVCOMPILE_CACHE/$(cat "$DEVICE_DIR/default-model-cache-dir")"
  mkdir -p "$dir" && cp -f "$DEVICE_DIR"/tokenizer/* "$dir"/
fi

step "bench/gpu.py (budget ${BUDGET}s)"
# shellcheck disable=SC2086
timeout --signal=INT --kill-after=15 "${BENCH_TIMEOUT_S:-$((BUDGET + 45))}" \
  $PY bench/gpu.py --tokenizer "$DEVICE_DIR/tokenizer" --text "$DEVICE_DIR/squad.txt" --out "$RESULTS" \
  --budget-s "$BUDGET" ${BENCH_ARGS:-}
bench_rc=$?
copy_results
echo "bench/gpu.py exit status $bench_rc"

test_rc=0
tests=${CUDA_TESTS:-$(ls tests/test_*cuda*.py 2>/dev/null | tr "\n" " ")}
if [ -n "$tests" ] && [ "${TEST_TIMEOUT_S:-120}" != 0 ]; then
  step "CUDA tests: $tests"
  # shellcheck disable=SC2086
  timeout --signal=INT --kill-after=10 "${TEST_TIMEOUT_S:-120}" $PY -m pytest -x -q -p no:cacheprovider $tests
  test_rc=$?
  echo "CUDA tests exit status $test_rc"
fi
step done
[ "$bench_rc" -ne 0 ] && exit "$bench_rc"
exit "$test_rc"
