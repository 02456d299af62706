#!/usr/bin/env bash
# Every GPU check in one go, for a lent H100/H200/A100 (see README "GPU checks"), inside one
# device call: the steps share a time budget (DEVICE_CHECK_BUDGET seconds, default 480) and a step
# that would not fit is skipped with a SKIP line, so the log always comes back.
#   1. build proalign._C (CUDA C++) for this GPU with CMake;
#   2. GPU correctness tests: Triton + CUDA C++ kernels (ProAlign, PANTHER) vs float64, poisoned
#      buffers; encoder CUDA graphs vs eager;
#   3. kernel benchmarks against torch eager and the device copy bandwidth;
#   4. cupy tissue mask vs the CPU one; GPU decode where DALI is installed;
#   5. slides end to end (CONCH v1 at real size, random weights): whole path vs encoder alone,
#      CUDA graphs vs eager, TRIDENT-style baseline;
#   6. peak host and GPU memory, a few thousand patches vs a 100,000-patch slide.
# The device image has torch, triton, cupy, numba, h5py, scipy, tifffile, tokenizers, pytest and
# pybind11, but no imagecodecs/openslide: carry them (fill .device first, here:
#   bash bench/device_check.sh --fetch-wheels), then on the device: bash bench/device_check.sh
# Results: $OUT/device_check.log and $OUT/*.json when OUT is set, else build/device_out.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --no-deps \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels_slides imagecodecs==2026.3.6 openslide-python==1.4.7 openslide-bin==4.0.1.2
  mkdir -p .device/testdata/tiles && cp -r ../shared/testdata/tiles/histolab .device/testdata/tiles/
  du -sh .device; ls .device/wheels_slides; exit 0
fi
OUT=${OUT:-$ROOT/build/device_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
BUDGET=${DEVICE_CHECK_BUDGET:-480}
status=0
# fits SECONDS_NEEDED NAME: true when the step still fits in the budget
fits() {
  if (( SECONDS + $1 > BUDGET )); then echo "SKIP: $2 (needs ~$1 s, $((BUDGET - SECONDS)) s left)"; return 1; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
if [[ -d .device/wheels_slides ]]; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels_slides/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# proalign.kernels is kernels/ (setup.py maps it); without an install, link it into the package.
ln -sfn ../../kernels python/proalign/kernels
export PYTHONPATH=$ROOT/python:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}
[[ -d .device/testdata ]] && export PROALIGN_TESTDATA=$ROOT/.device/testdata
PYTEST="python -m pytest -q -p no:cacheprovider -rs"

echo "== 1. build proalign._C ($SECONDS s)"
CC_MAJOR=$(python -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
if command -v nvcc >/dev/null && python -c "import pybind11" 2>/dev/null; then
  timeout 240 cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$CC_MAJOR" \
    -DPython_EXECUTABLE="$(command -v python)" -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/python/proalign" >/dev/null \
    && timeout 240 cmake --build build/native -j 16 || status=1
else
  echo "SKIP: nvcc or pybind11 missing: the CUDA C++ backend is not checked"
fi
python -m proalign.doctor || status=1

echo "== 2. correctness on the device ($SECONDS s)"
fits 150 "kernel tests" && { timeout 200 $PYTEST tests/ops tests/test_aggregate.py || status=1; }
fits 40 "encoder CUDA graph tests" && { timeout 90 $PYTEST tests/test_encoders.py -k cuda_graphs || status=1; }

echo "== 3. kernel benchmarks ($SECONDS s)"
for args in "--d 512 --k 16" "--d 512 --k 16 --over patches --tau 0.1" "--d 1024 --k 32" "--d 512 --k 16 --dtype float16" "--method panther --d 512 --k 16" \
    "--n 1000000 --d 512 --k 16"; do
  fits 20 "aggregate $args" && { timeout 60 python -m proalign.bench.aggregate --n 100000 $args --device cuda \
    --check || status=1; }
done

echo "== 4. slides on the GPU ($SECONDS s)"
fits 30 "cupy tissue mask" && { timeout 60 $PYTEST tests/test_tissue_grid.py -k gpu || status=1; }
# DALI (nvJPEG / hardware decoder) is ~480 MB installed: it cannot travel in the 64 MiB carry, so GPU
# decode runs only where DALI is preinstalled.
if python -c "import nvidia.dali, imagecodecs, openslide" 2>/dev/null; then
  fits 90 "GPU decode tests" && { timeout 120 $PYTEST tests/test_gpu_decode.py || status=1; }
else
  echo "SKIP: nvidia-dali not installed here: GPU decode not checked"
fi

if python -c "import imagecodecs, openslide, tifffile, tokenizers, h5py" 2>/dev/null; then
  echo "== 5. slides end to end, CONCH v1 ViT-B/16 at 448 px, random weights ($SECONDS s)"
  fits 150 "end to end" && { timeout 200 python -m proalign.bench.end_to_end --slides 2 --size 10000 --model base \
    --device cuda --batch-size 256 --workdir build/e2e | tee "$OUT/end_to_end.txt" || status=1; }
  echo "== 6. peak memory, a few thousand patches vs a 100,000-patch slide ($SECONDS s)"
  fits 120 "slide memory" && { timeout 180 python -m proalign.bench.slide_memory --size 12000 --patches 100000 \
    --model tiny --device cuda --batch-size 512 --workdir build/mem --json "$OUT/slide_memory.json" || status=1; }
else
  echo "SKIP: imagecodecs/openslide missing (bash bench/device_check.sh --fetch-wheels, carry .device)"
fi
echo "device_check status: $status after $SECONDS s"
exit $status
