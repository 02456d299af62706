"""proalign-engine: the Python package (python/proalign, kernels/ as proalign.kernels)."""
from setuptools import setup

setup(
    name="proalign-engine",
    version="0.1.0",
    description="ProAlign slide embeddings for whole-slide-image archives",
    python_requires=">=3.10",
    package_dir={"proalign": "python/proalign", "proalign.kernels": "kernels"},
    packages=["proalign", "proalign.aggregate", "proalign.features", "proalign.prototypes", "proalign.store",
              "proalign.pipeline", "proalign.bench", "proalign.kernels"],
    install_requires=[
        "numpy>=1.26",
        "torch>=2.4",  # pinned to the local CPU wheel by constraints.txt; unpinned pip pulls a CUDA build
        "h5py>=3.10",
        "lmdb>=1.4",
        "click>=8.1",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "pyarrow>=14",
    ],
    extras_require={
        "gpu": ["triton>=3.0", "cupy-cuda13x", "nvidia-dali-cuda130"],
        "ray": ["ray[data]>=2.40"],
        "dev": ["pytest>=8", "numba>=0.60", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["proalign-engine=proalign.cli:main"]},
)
