#!/usr/bin/env bash
# GPU benchmark: one prepared run of at most 10 minutes on a machine with one CUDA GPU (an H200 node: 16 cores).
# Installs only this project (no dependencies: torch, torchvision and the rest are expected on the machine), then:
#   1. the CUDA parity tests of the batched preprocessing (tests/test_batch_transforms.py, its `cuda` cases);
#   2. the encoder table on the GPU: imagebind_huge layout with RANDOM weights (speed does not depend on the
#      values), fp32 and bf16, batch 1 and 32, each dtype's cosine to fp32, and the preprocessing of windows
#      one at a time on the CPU against batched on the GPU (`bench encoders --preprocessing`);
#   3. `bench capacity` with the embedders on the GPU, which preprocess there (`preprocess_on = auto`);
#   4. the encoder table on this node's CPUs: fp32, bf16 and int8, batch 1;
# and prints one Markdown table of them to paste in the README. Each step is bounded (`timeout`, and all of them
# by BUDGET_S); a failing step is reported and the next one runs. The JSON of each step stays in $RESULTS.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-$(mktemp -d)}
BUDGET_S=${BUDGET_S:-560}  # for all the steps; the table comes after
FAILED=()

step() {  # step NAME LIMIT_S COMMAND: run the bash COMMAND for at most LIMIT_S seconds (less if the budget ends)
    local name=$1 limit=$2 command=$3 left=$((BUDGET_S - SECONDS)) rc
    if ((left < 20)); then
        echo "=== $name: not run, the ${BUDGET_S} s budget is spent" >&2
        FAILED+=("$name (not run: budget spent)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (at most $limit s, at $SECONDS s)" >&2
    timeout --kill-after=10 "$limit" bash -c "$command"
    rc=$?
    if ((rc != 0)); then
        local why="exit $rc"
        ((rc == 124 || rc == 137)) && why="timed out after $limit s"
        echo "=== $name FAILED: $why" >&2
        FAILED+=("$name ($why)")
    fi
}

step install 120 "python3 -m pip install -q --no-deps -e . >/dev/null"
step cuda 60 "python3 -c \"import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)\""
step parity 120 "python3 -m pytest -q -p no:cacheprovider tests/test_batch_transforms.py -k cuda"
step encoders-gpu 200 "bindstream bench encoders --model imagebind_huge --device cuda --dtype float32,bfloat16 \
    --batch 1,32 --min-seconds 1 --preprocessing --json > '$RESULTS/encoders_gpu.json'"
step capacity 220 "bindstream bench capacity --seconds 10 --max-wearables 1024 --json > '$RESULTS/capacity.json'"
step encoders-cpu 150 "bindstream bench encoders --model imagebind_huge --device cpu --dtype float32,bfloat16,int8 \
    --batch 1 --min-seconds 0.5 --json > '$RESULTS/encoders_cpu.json'"

python3 - "$RESULTS" <<'EOF'
"""One Markdown table of the steps' JSON (a '-' where a step gave none)."""
import json
import sys
from pathlib import Path

import torch

results = Path(sys.argv[1])


def load(name):
    try:
        return json.loads((results / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


gpu, cpu, capacity = load("encoders_gpu"), load("encoders_cpu"), load("capacity")
rows = {(r["modality"], r["dtype"], r["batch"], where): r for where, f in (("gpu", gpu), ("cpu", cpu)) for r in f.get("encoders", [])}
prep = {(r["modality"], r["batch"]): r for r in gpu.get("preprocessing", [])}


def cell(key, field, fmt):
    row = rows.get(key)
    return fmt.format(row[field]) if row else "-"


def cells(modality, dtypes, field, fmt):
    return " / ".join(cell((modality, d, 1, "cpu"), field, fmt) for d in dtypes)


name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
model = gpu.get("model") or cpu.get("model") or "imagebind_huge"
weights = "RANDOM weights (speed does not depend on the values)" if (gpu or cpu).get("random_weights", True) else "its checkpoint"
print(f"\n{name}, {torch.get_num_threads()} CPU threads; {model} layout with {weights}\n")
print("| modality | GPU fp32 b32 clips/s | GPU bf16 b1 / b32 clips/s | GPU bf16 cos | CPU fp32 / bf16 / int8 b1 clips/s | CPU bf16 / int8 cos | preprocessing b32 windows/s: CPU one at a time / GPU batched |")
print("|---|---|---|---|---|---|---|")
for m in ("vision", "text", "audio", "depth", "thermal", "imu"):
    p = prep.get((m, 32))
    preprocessing = "{:.0f} / {:.0f}".format(p["cpu_windows_per_s"], p["device_windows_per_s"]) if p else "-"
    print(
        f"| {m} | {cell((m, 'float32', 32, 'gpu'), 'clips_per_s', '{:.0f}')} "
        f"| {cell((m, 'bfloat16', 1, 'gpu'), 'clips_per_s', '{:.0f}')} / {cell((m, 'bfloat16', 32, 'gpu'), 'clips_per_s', '{:.0f}')} "
        f"| {cell((m, 'bfloat16', 32, 'gpu'), 'cosine', '{:.4f}')} "
        f"| {cells(m, ('float32', 'bfloat16', 'int8'), 'clips_per_s', '{:.2f}')} "
        f"| {cells(m, ('bfloat16', 'int8'), 'cosine', '{:.4f}')} | {preprocessing} |"
    )
if capacity:
    stages = ", ".join(f"{k} {v:.2f}" for k, v in capacity.get("per_stage_cpu_ms", {}).items())
    print(
        f"\n`bench capacity` (model {capacity.get('model', 'tiny')}, preprocessing on the GPU): "
        f"{capacity.get('wearables')} wearables in real time, {capacity.get('windows_per_s', 0):.0f} windows/s, "
        f"{capacity.get('cpu_ms_per_window', 0):.2f} core-ms per window outside the forward ({stages}), "
        f"efficiency {capacity.get('efficiency', 0):.2f}"
    )
EOF

if ((${#FAILED[@]})); then
    printf 'FAILED: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
