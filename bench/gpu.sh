#!/usr/bin/env bash
# GPU benchmark for a machine with CUDA (run once, read the table, record it in the README).
# Installs only this project (no dependencies: torch and the rest are expected on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps -e . >/dev/null
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
bindstream bench encoders --model imagebind_huge --device cuda --dtype bfloat16,float32 --batch 1,8,32,64 \
    --min-seconds 2
