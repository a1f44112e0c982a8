#!/usr/bin/env bash
# What a GPU machine without network needs from here, in git-ignored folders, for a lease whose calls each carry the
# source tree plus at most 64 MiB in all (benchmarks/README.md, "Steps on the GPU machine"):
#
#   bash benchmarks/gpu_staging.sh TARGET [train]
#
# - .gguf/TARGET/NN/: the target's GGUF (`run_benchmark.py materialize --target TARGET`) in pieces, one folder per
#   call, each piece as large as fits beside the tree as it stands now (tracked files and untracked ones git does not
#   ignore). Carry one folder per call and move its piece out of the way there, e.g. into runs/gguf/; then
#   `run_benchmark.py materialize --target TARGET --gguf runs/gguf/TARGET.part*` reassembles and checks it.
# - .whl/: the pure-Python wheels the machine lacks for Python 3.12: gguf; with `train` also datasets, trl, dill and
#   multiprocess (the data and training stages). Carry .whl in a call of its own, then
#   `pip install --no-index --no-deps --target runs/deps .whl/*.whl` and run with PYTHONPATH=src:runs/deps.
#
# Environment: MARGIN (bytes kept free under the limit, default 1 MiB), PYTHON (default python).
set -euo pipefail
TARGET=${1:?usage: gpu_staging.sh TARGET [train]}
STAGE=${2:-}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."

limit=$((64 * 1024 * 1024))
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
piece=$((limit - tree - ${MARGIN:-1048576}))
if [ "$piece" -le 0 ]; then
  echo "The tree alone ($tree bytes) leaves no room under the 64 MiB a call carries." >&2
  exit 1
fi

gguf=$("$PYTHON" benchmarks/run_benchmark.py materialize --target "$TARGET" | tail -1)
rm -rf ".gguf/$TARGET"
mkdir -p ".gguf/$TARGET"
split -b "$piece" -d -a 2 "$gguf" ".gguf/$TARGET/$TARGET.part"
for file in ".gguf/$TARGET/$TARGET.part"*; do
  folder=".gguf/$TARGET/${file##*.part}"
  mkdir -p "$folder" && mv "$file" "$folder/"
done
count=$(find ".gguf/$TARGET" -name "$TARGET.part*" | wc -l)
echo "$gguf: $count pieces of at most $piece bytes (tree $tree bytes) in .gguf/$TARGET/NN/, one call each."

names=(gguf)
if [ "$STAGE" = train ]; then names+=(datasets trl dill multiprocess); fi
# The versions installed here, where the project's tests ran with them; the newest otherwise.
wheels=()
for name in "${names[@]}"; do
  version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  wheels+=("$name${version:+==$version}")
done
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d .whl "${wheels[@]}"
echo "Wheels in .whl: $(ls .whl | tr '\n' ' ')"
