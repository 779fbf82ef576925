#!/usr/bin/env bash
# On a lent H200 (device tool), after benchmarks/gpu/prepare.sh here:
#   run(command="bash benchmarks/gpu/run_h200.sh", carry=[".gpu", "data/dataset.parquet"],
#       timeout_s=590)
# then, here: tar -xzf <files_at>/results.tgz -C benchmarks/results/
# Ours (bf16 autocast) vs transformers.Trainer + peft for full, lora and last_block on
# SmolLM2-135M's architecture (random init: the same shapes, speed and memory as the
# weights), at the largest power-of-two batch whose estimated peak fits TARGET_GIB, against
# the Trainer configured as a user would (bf16=True, group_by_length), then its fp32
# defaults. Each method runs in one process (--in-process; CUDA's peak is reset per run);
# the matmul microbenchmark at start records the card's achieved bf16 rate beside the
# datasheet peak the MFU uses. The results go back as one
# archive ($OUT/results.tgz) beside the log: the device returns 8 files at most.
# A CPU smoke test of this script: SMOKE=1 bash benchmarks/gpu/run_h200.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PEFTFLOW_ALLOCATOR=system
MODEL=.gpu/models/smollm2-135m
TARGET_GIB=${TARGET_GIB:-70}
PY=python3
if [[ -n ${SMOKE:-} ]]; then  # here, on the CPU: the script's logic, with the venv's packages
  PY=.venv/bin/python
  DEVICE=cpu MAX_LENGTH=16 STEPS=1 WARMUP=1 REPEATS=1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
"$PY" - <<'PY' || exit 1
import peft, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
print("transformers", transformers.__version__, "peft", peft.__version__)
PY
FIT=$("$PY" - "$MODEL" "$TARGET_GIB" <<'PY'
import sys

from peftflow.config import parse_config
from peftflow.task.memory import estimate_config

model, target = sys.argv[1], float(sys.argv[2]) * 2**30
def estimate(batch):
    cfg = parse_config({"name": "fit", "model": {"name": model, "max_length": 192,
        "pretrained": False}, "method": {"name": "full"},
        "train": {"batch_size": batch, "device": "cuda", "precision": "bf16"}})
    return estimate_config(cfg).total_bytes
batch = 8
while batch < 1024 and estimate(2 * batch) <= target:
    batch *= 2
print(batch)
print(f"batch {batch}: full fine-tuning estimated {estimate(batch) / 2**30:.1f} GiB", file=sys.stderr)
PY
) || exit 1
BATCH=${BATCH:-$FIT}
[[ -n ${SMOKE:-} ]] && BATCH=2  # the fit was for the GPU
echo "batch size: $BATCH"
RESULTS=/tmp/results
rm -rf "$RESULTS"
COMMON=(--model "$MODEL" --random-init --batch-size "$BATCH" --max-length "${MAX_LENGTH:-192}"
        --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" --repeats "${REPEATS:-3}"
        --device "${DEVICE:-cuda}" --in-process --data auto --out "$RESULTS")
pack() {  # after every benchmark: a run cut short by the call's limit still returns the rest
  [[ -d $RESULTS ]] && tar -czf "$OUT/results.tgz" -C "$RESULTS" .
}
bench() {  # seconds, then the benchmark's own arguments (they override COMMON's)
  local limit=$1 start=$SECONDS
  shift
  timeout "$limit" "$PY" benchmarks/train_throughput.py "${COMMON[@]}" "$@" | grep -v '^|' \
    || echo "FAILED: $*"
  echo "took $((SECONDS - start)) s: $*"
  pack
}
# The headline: ours (bf16 autocast) vs the Trainer as a user configures it (--baseline fair:
# bf16=True, group_by_length). At most ~9.5 min in all (the budget is 10), so each is capped.
for method in full lora last_block; do bench 120 --method "$method" --tag h200; done
# A secondary row: the Trainer's defaults (fp32), the Trainer alone, LoRA only.
bench 90 --method lora --sides trainer --baseline fp32 --tag h200-trainer-fp32
# train.compile (torch.compile) for full fine-tuning, ours alone, once: compiling takes warm-up.
bench 120 --method full --sides ours --compile --repeats 1 --warmup 8 --tag h200-compile
tar -tzf "$OUT/results.tgz"
