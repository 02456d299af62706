"""Synthetic cohorts of patch features, written the way TRIDENT and CLAM write them.

For the demo, the tests and the benchmarks. Patches are drawn around G planted "tissue type"
centres with a per-slide Dirichlet mixture, so prototypes have structure to find. The vectors
mean nothing biologically.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch


def tissue_centres(g: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    c = rng.standard_normal((g, d))
    return 3.0 * c / np.linalg.norm(c, axis=1, keepdims=True)


def slide_features(n: int, centres: np.ndarray, rng: np.random.Generator, noise: float = 0.6) -> np.ndarray:
    g, d = centres.shape
    mix = rng.dirichlet(np.full(g, 0.5))
    types = rng.choice(g, size=n, p=mix)
    return (centres[types] + noise * rng.standard_normal((n, d)) / np.sqrt(d) * 4).astype(np.float32)


def grid_coords(n: int, patch: int = 512) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n)))
    idx = np.arange(n)
    return np.stack([(idx % side) * patch, (idx // side) * patch], axis=1).astype(np.int64)


def write_trident_h5(path: Path, features: np.ndarray, coords: np.ndarray, encoder: str = "conch_v1") -> None:
    """TRIDENT `features_<encoder>/<slide>.h5`: `features` (N, d) and `coords` (N, 2) int64, both
    in one-row chunks, with their attributes."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", data=features, chunks=(1, features.shape[1]),
                              maxshape=(None, features.shape[1]))
        ds.attrs.update({"name": path.stem, "savetodir": str(path.parent), "encoder": encoder})
        cs = f.create_dataset("coords", data=coords, chunks=(1, 2), maxshape=(None, 2))
        cs.attrs.update({"patch_size": 512, "patch_size_level0": 512, "level0_magnification": 20,
                         "target_magnification": 20, "overlap": 0, "name": path.stem, "savetodir": str(path.parent)})


def write_clam_h5(path: Path, features: np.ndarray, coords: np.ndarray, batch: int = 1) -> None:
    """CLAM `extract_features_fp.py`: datasets created with maxshape (None, ...) and appended
    batch by batch; batch=1 gives the legacy one-row chunks. Legacy coords attributes."""
    with h5py.File(path, "w") as f:
        for start in range(0, len(features), batch):
            for name, data in (("features", features), ("coords", coords)):
                part = data[start:start + batch]
                if name not in f:
                    f.create_dataset(name, data=part, maxshape=(None,) + part.shape[1:], chunks=(1,) + part.shape[1:])
                else:
                    ds = f[name]
                    ds.resize(ds.shape[0] + len(part), axis=0)
                    ds[-len(part):] = part
        f["coords"].attrs.update({"patch_level": 0, "patch_size": 256, "downsample": np.array([1.0, 1.0]),
                                  "downsampled_level_dim": np.array([40000, 30000]),
                                  "level_dim": np.array([40000, 30000]), "name": path.stem, "save_path": str(path.parent)})


def write_cohort(out: str | Path, n_slides: int = 24, d: int = 512, n_range: tuple[int, int] = (200, 3000),
                 g: int = 16, seed: int = 0, fmt: str = "trident", dtype: str = "float32") -> list[Path]:
    """Write `n_slides` feature files to `out` (fmt: trident | clam | pt); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    centres = tissue_centres(g, d, seed)
    paths = []
    for i in range(n_slides):
        rng = np.random.default_rng([seed, i])
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        x = slide_features(n, centres, rng).astype(dtype)
        sid = f"SYN-{seed:02d}-{i:05d}"
        if fmt == "trident":
            p = out / f"{sid}.h5"
            write_trident_h5(p, x, grid_coords(n))
        elif fmt == "clam":
            p = out / f"{sid}.h5"
            write_clam_h5(p, x, grid_coords(n), batch=max(1, n // 7))
        elif fmt == "pt":
            p = out / f"{sid}.pt"
            torch.save(torch.from_numpy(x), p)
        else:
            raise ValueError(f"unknown format {fmt!r}")
        paths.append(p)
    return paths
