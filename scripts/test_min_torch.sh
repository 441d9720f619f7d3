#!/usr/bin/env bash
# Run the core tests against the oldest versions pyproject.toml allows.
#
# Reads the `dependencies` of pyproject.toml, turns every lower bound into a pin (torch>=2.4 ->
# torch==2.4), installs the project with exactly those pins (plus pytest and hypothesis, and no
# optional extra) into a fresh venv, and runs the core tests there. Tests that need an extra skip.
#
#   bash scripts/test_min_torch.sh                      # the core tests (load, model, tokenizer,
#                                                       # preprocess, checkpoint, min versions)
#   bash scripts/test_min_torch.sh tests/test_optimize.py   # other test files instead
#   PYTHON=python3.9 bash scripts/test_min_torch.sh     # the oldest Python too
#   MIN_TORCH_VENV=/tmp/venv-mintorch bash scripts/...  # keep (and reuse) the venv
#
# PyPI's Linux torch wheels bring the CUDA libraries: the install downloads about 3 GB and the
# venv takes about 5 GB of disk. Without MIN_TORCH_VENV the venv is deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
venv="${MIN_TORCH_VENV:-}"
if [[ -z "$venv" ]]; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    venv="$scratch/venv"
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"

# The runtime requirements, each lower bound made a pin ("torch>=2.4" -> "torch==2.4").
mapfile -t pins < <(python - <<'EOF'
import re

text = open("pyproject.toml", encoding="utf-8").read()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
if block is None:
    raise SystemExit("pyproject.toml: no dependencies = [...] block")
for requirement in re.findall(r'"([^"]+)"', block.group(1)):
    print(re.sub(r">=\s*([^,;\s]+).*", r"==\1", requirement))
EOF
)
if [[ " ${pins[*]:-} " != *" torch=="* ]]; then
    echo "no torch>=X lower bound found in pyproject.toml's dependencies: ${pins[*]:-none}" >&2
    exit 1
fi
echo "== install ${pins[*]} (python $(python -c 'import platform; print(platform.python_version())'))"
start=$SECONDS
pip install --quiet --disable-pip-version-check -e . "${pins[@]}" pytest hypothesis
echo "   installed in $((SECONDS - start)) s"
python - <<'EOF'
from importlib.metadata import version

print("  ", ", ".join(f"{d} {version(d)}" for d in
                      ("torch", "torchvision", "numpy", "pillow", "ftfy", "regex", "tqdm")))
EOF

if [[ $# -eq 0 ]]; then
    set -- tests/test_load.py tests/test_model.py tests/test_tokenizer.py \
        tests/test_preprocess.py tests/test_checkpoint.py tests/test_min_versions.py
fi
echo "== tests: $*"
start=$SECONDS
python -m pytest -q -p no:cacheprovider "$@"
echo "   tests ran in $((SECONDS - start)) s"
