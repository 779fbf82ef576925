#!/usr/bin/env bash
# Stage, on this (GPU-less) machine, what benchmarks/gpu/run_h200.sh needs on a lent H200
# into .gpu/ (git-ignored; the device tool's `carry` takes it there, 64 MiB at most):
#   .gpu/models/smollm2-135m/  config + tokenizer only: the weights (260 MB) are over the
#                              carry limit, and --random-init trains the same shapes at the
#                              same speed and memory
#   .gpu/wheels/               the locked versions of the packages the device image lacks
#                              or holds at other versions (Python 3.12, manylinux x86-64)
# Then, with the device tool: run(command="bash benchmarks/gpu/run_h200.sh",
#   carry=[".gpu", "data/dataset.parquet"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/models
$PY - <<'PY'
import shutil
from pathlib import Path

from peftflow.models.assets import resolve_model

source = Path(resolve_model("smollm2-135m").location)
target = Path(".gpu/models/smollm2-135m")
target.mkdir(parents=True)
for item in source.iterdir():
    if item.is_file() and item.suffix not in (".safetensors", ".gguf", ".bin"):
        shutil.copy(item, target / item.name)
print("model skeleton:", sorted(p.name for p in target.iterdir()))
PY
# transformers/peft/huggingface-hub/tokenizers as locked, what they and peftflow.config need
# that the image (KINDS.md's package list) lacks, and the packages whose minimum versions
# (METADATA) are above what an older image may hold: typing-extensions (pydantic needs
# >=4.16), regex (transformers needs >=2025.10.22), click (huggingface-hub needs >=8.4.2).
PACKAGES="transformers peft huggingface-hub tokenizers httpx2 httpcore2 truststore pydantic
pydantic-core annotated-types typing-inspection typing-extensions regex click"
for name in $PACKAGES; do
  version=$(awk -v n="$name" '$0 == "name = \"" n "\"" {getline; split($0, v, "\""); print v[2]; exit}' uv.lock)
  [[ -n $version ]] || { echo "no locked version of $name in uv.lock" >&2; exit 1; }
  ${PIP:-python3 -m pip} download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/wheels "$name==$version"
done
ls .gpu/wheels
du -sh .gpu
