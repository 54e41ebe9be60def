#!/usr/bin/env bash
# The GPU checks and benchmarks, in one call on a lent GPU machine (see benchmarks/README.md).
#
# That machine has PyTorch, transformers, h5py and TensorStore but not zarr, and no
# network: carry the wheels made here first, then run this script there:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --no-deps --dest .gpu-wheels zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu-wheels"], timeout_s=560)
# Results land in $OUT (default ./gpu-out): test log, benchmark JSON and tables.
# QUICK=1 runs the tests and one short benchmark (run.py --quick) only; with DEVICE=cpu
# and PYTHON=.venv/bin/python that checks this script on a machine without a GPU.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
log() { echo "[gpu_check $(date +%T)] $*"; }

if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
  $PY -m pip install -q --no-index --find-links .gpu-wheels zarr numcodecs google-crc32c donfig 2>&1 | tail -2
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
fi
$PY -c "import torch, transformers, zarr, featstore; print('torch', torch.__version__, 'transformers', transformers.__version__, 'zarr', zarr.__version__, 'cuda', torch.cuda.is_available())"

log "GPU tests"
HF_HUB_OFFLINE=1 timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.txt" | tail -15

run_bench() {  # name, then benchmarks/run.py arguments
  local name=$1; shift
  log "benchmark $name"
  timeout 200 $PY benchmarks/run.py --device "$DEVICE" --skip read,memory --repeats 1 --out "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "exit $?" >> "$OUT/$name.log"
  sed -n '/^Throughput/,$p' "$OUT/$name.log" | grep -v -e '^wrote' -e ' SKIP '
}
if [ "${QUICK:-0}" = 1 ]; then
  run_bench quick --quick
  exit 0
fi
run_bench vit-l14-jpeg --model ViT-L/14 --input-kind jpeg --images 8192 --baseline-images 128
run_bench dinov2-large-jpeg --model dinov2-large --input-kind jpeg --images 8192 --baseline-images 128 --batch-sizes 64,128,256,512
log "done"
