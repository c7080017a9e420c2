#!/usr/bin/env bash
# Every GPU figure, for a machine with a CUDA GPU and PyTorch but no package index (the device
# tool's: 15 minutes of device time for all tries together, 10 minutes a command). Prepare here:
#   bash benchmarks/gpu/wheels.sh
# then, from the repository root there, carrying .whl, two calls back to back (the machine stays
# warm between them only briefly):
#   bash benchmarks/gpu/run.sh check     # ~2 min: the demo's job on the GPU against the CPU (check.py)
#   bash benchmarks/gpu/run.sh bench     # < 8 min: benchmarks/run_all.py --device cuda
# Results land in $OUT (the device tool sets it; default benchmarks/results): commit them with
# the README's GPU row, the GPU named.
set -euo pipefail
what="${1:-check}"
OUT="${OUT:-benchmarks/results}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu-$what.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu-$what.txt"
start=$(date +%s)
case "$what" in
    check) python3 benchmarks/gpu/check.py --out "$OUT" 2>&1 | tee "$OUT/check.log" ;;
    bench) python3 benchmarks/run_all.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/run_all.log" ;;
    *) echo "usage: $0 check|bench" >&2; exit 2 ;;
esac
echo "$what: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu-$what.txt"
