"""proalign-engine: the Python package (python/proalign, kernels/ as proalign.kernels) and, when
cmake and a C++ compiler are on PATH, the native module proalign._C built by CMake (engine/ +
bindings/, plus csrc/ when nvcc is there too)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        cfg = ["-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
               f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
        if "CUDA_ARCHS" in os.environ:  # e.g. CUDA_ARCHS="90" for a quicker build on an H100
            cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CUDA_ARCHS']}")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], check=True)


# Without a compiler the package runs on the Python twins of everything in _C.
native = (shutil.which("cmake") is not None and (shutil.which("c++") or shutil.which("g++"))
          and not os.environ.get("PROALIGN_NO_NATIVE"))

setup(
    name="proalign-engine",
    version="0.1.0",
    description="ProAlign slide embeddings for whole-slide-image archives",
    python_requires=">=3.10",
    package_dir={"proalign": "python/proalign", "proalign.kernels": "kernels"},
    # kernels/ is installed as proalign.kernels (device_check.sh may leave a link of that name in python/)
    packages=find_packages("python", exclude=["proalign.kernels"]) + ["proalign.kernels"],
    package_data={"proalign.prototypes.descriptions": ["*.json"]},  # shipped description sets, schema.json
    install_requires=[
        "numpy>=1.26",
        "torch>=2.4",  # pinned to the local CPU wheel by constraints.txt; unpinned pip pulls a CUDA build
        "h5py>=3.10",
        "lmdb>=1.4",
        "click>=8.1",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "tokenizers>=0.15",  # encoders: CONCH / CLIP tokenizers read from local tokenizer files
        "pyarrow>=14",
        "scipy>=1.11",  # tissue-mask morphology
        "pillow>=10",
        "matplotlib>=3.8",  # eval pictures (Agg backend)
        "tifffile>=2024.1",  # synthetic slides; the TIFF fast path parses directories itself
        "imagecodecs>=2024.1",  # CPU decode of JPEG / JPEG 2000 / LZW / Deflate tiles
        "openslide-python>=1.4",
        "openslide-bin>=4.0",  # OpenSlide 4 (DICOM, NDPI, MRXS, ...) as a wheel
    ],
    extras_require={
        "gpu": ["triton>=3.0", "cupy-cuda13x", "nvidia-dali-cuda130"],
        "ray": ["ray[data]>=2.40"],
        # cuCIM, the patch benchmark's second peer: its CPU reader needs only `pip install --no-deps
        # cucim-cu13 lazy-loader` (what CI does); this extra also pulls CuPy and the CUDA 13 wheels
        "cucim": ["cucim-cu13>=26.10"],
        # triton: interpreter tests + AOT check; DALI: its CPU decoder is tested against imagecodecs
        "dev": ["pytest>=8", "numba>=0.60", "triton>=3.0", "nvidia-dali-cuda130", "ray[data]>=2.40",
                "scikit-learn>=1.4"],  # ray: 11 s install, tests under a timeout
    },
    entry_points={"console_scripts": ["proalign-engine=proalign.cli:main"]},
    ext_modules=[CMakeExtension("proalign._C")] if native else [],
    cmdclass={"build_ext": CMakeBuild},
)
