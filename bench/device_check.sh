#!/usr/bin/env bash
# Every GPU check in one go, for a lent H100/H200/A100 (see README "GPU checks"):
#   1. build proalign._C (CUDA C++) for this GPU with CMake;
#   2. run the GPU correctness tests (Triton + CUDA C++, ProAlign and PANTHER, vs the float64
#      reference, poisoned buffers);
#   3. benchmark every backend against torch eager and the device copy bandwidth.
# The device has no package registry: wheels it lacks (pybind11, pytest) are carried in
# .device/wheels (fill it here first: bash bench/device_check.sh --fetch-wheels).
# Usage on the device: bash bench/device_check.sh  (results also written under $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d .device/wheels \
    pybind11==3.1.0 pytest==9.2.0 iniconfig pluggy packaging
  # the slides path (optional: about 40 MB, mind the 64 MiB carry): readers and tokenizer
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d .device/wheels_slides \
    tifffile==2026.3.3 imagecodecs==2026.3.6 openslide-python==1.4.7 openslide-bin==4.0.1.2 tokenizers==0.23.3 || true
  mkdir -p .device/testdata/tiles && cp -r ../shared/testdata/tiles/histolab .device/testdata/tiles/
  ls .device/wheels .device/testdata/tiles; exit 0
fi
OUT=${OUT:-$ROOT/build/device_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
for w in pybind11 pytest; do
  python -c "import $w" 2>/dev/null || python -m pip install -q --no-index --find-links .device/wheels "$w" || true
done
[[ -d .device/wheels_slides ]] && python -m pip install -q --no-index --no-deps .device/wheels_slides/*.whl || true
# proalign.kernels is kernels/ (setup.py maps it); without an install, link it into the package.
ln -sfn ../../kernels python/proalign/kernels
export PYTHONPATH=$ROOT/python:$ROOT/tests

echo "== 1. build proalign._C"
CC_MAJOR=$(python -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
if command -v nvcc >/dev/null && python -c "import pybind11" 2>/dev/null; then
  cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$CC_MAJOR" \
    -DPython_EXECUTABLE="$(command -v python)" -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$ROOT/python/proalign" >/dev/null && cmake --build build/native -j 16 || status=1
else
  echo "SKIP: nvcc or pybind11 missing: the CUDA C++ backend is not checked"
fi
python -m proalign.doctor 2>/dev/null || python -c "from proalign.doctor import report; import json; print(json.dumps(report()['backends'], indent=1))"

echo "== 2. correctness on the device"
if python -c "import pytest" 2>/dev/null; then
  timeout 420 python -m pytest -q -p no:cacheprovider tests/test_backends.py tests/test_aggregate.py \
    tests/test_panther_moments.py || status=1
else
  echo "SKIP: pytest missing; the benchmark below still checks every backend against float64"
fi

echo "== 3. benchmarks"
for args in "--d 512 --k 16" "--d 1024 --k 32" "--d 512 --k 16 --dtype float16" "--method panther --d 512 --k 16" \
    "--method panther --d 1024 --k 32"; do
  timeout 120 python -m proalign.bench.aggregate --n 100000 $args --device cuda --check || status=1
done
timeout 120 python -m proalign.bench.aggregate --n 1000000 --d 512 --k 16 --device cuda --check || status=1

echo "== 4. slides on the GPU"
# cupy tissue mask vs the CPU one (needs the histolab tiles: copy ../shared/testdata/tiles into
# .device/testdata/tiles and carry .device, or the test skips)
[[ -d .device/testdata ]] && export PROALIGN_TESTDATA=$ROOT/.device/testdata
if python -c "import pytest, scipy, h5py" 2>/dev/null; then
  timeout 120 python -m pytest -q -p no:cacheprovider tests/test_tissue_grid.py -k gpu -rs || status=1
fi
# DALI (nvJPEG / hardware decoder) is ~480 MB installed: it cannot travel in the 64 MiB carry, so GPU
# decode runs only where DALI is preinstalled.
if python -c "import nvidia.dali, imagecodecs, openslide, tifffile" 2>/dev/null; then
  timeout 300 python -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py -rs || status=1
  timeout 600 python -m proalign.bench.patches --decoder dali-gpu --large 0 --workdir build/patches || status=1
  timeout 600 python -m proalign.bench.patches --decoder cpu --large 0 --workdir build/patches || status=1
else
  echo "SKIP: nvidia-dali/imagecodecs/openslide not installed here: GPU decode not measured"
fi

echo "== 5. slides end to end on the GPU (CONCH v1 architecture, random weights, real size)"
if python -c "import imagecodecs, openslide, tifffile, tokenizers, h5py" 2>/dev/null; then
  timeout 600 python -m proalign.bench.end_to_end --slides 3 --size 16000 --model base --device cuda \
    --batch-size 256 --workdir build/e2e || status=1
else
  echo "SKIP: imagecodecs/openslide/tifffile/tokenizers/h5py missing (bash bench/device_check.sh --fetch-wheels)"
fi
echo "device_check status: $status"
exit $status
