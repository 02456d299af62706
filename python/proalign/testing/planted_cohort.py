"""A cohort of patch features whose labels are planted in the features, so an evaluation has a
known answer (the tests, and a quick look at the evaluation commands).

Each patient has a class and a grade in [0, 1]. Class 0 slides have no patches of tissue types
2 and 3, class 1 slides none of types 0 and 1 (the other types mix at random). Type 4 makes up a
share 0.5 * grade of a slide's patches, and its patches shift along a fixed direction by
grade * `shift`; the survival time is exp(-4 grade + noise), about 20% censored (earlier).
Patients are TCGA-style barcodes; every third patient has two slides.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from .synthetic_features import grid_coords, tissue_centres, write_trident_h5

CLASSES = ("LUAD", "LUSC")


def planted_cohort(out: str | Path, n_patients: int = 48, d: int = 512, g: int = 16, seed: int = 0,
                   n_range: tuple[int, int] = (150, 260), shift: float = 2.5) -> dict[str, Path]:
    """Write OUT/features/<slide>.h5 (TRIDENT layout), OUT/labels.csv (slide_id, patient_id, label,
    time, event, grade) and OUT/prototypes.safetensors (the true type centres, with type names).
    Returns those paths."""
    from ..prototypes.io import save_prototypes

    out = Path(out)
    feats = out / "features"
    feats.mkdir(parents=True, exist_ok=True)
    centres = tissue_centres(g, d, seed)
    rng = np.random.default_rng([seed, 11])
    direction = rng.standard_normal(d)
    direction *= shift / np.linalg.norm(direction)
    rows = []
    for p in range(n_patients):
        cls, grade = p % 2, float(rng.uniform())
        pid = f"TCGA-PL-{p:04d}"
        alpha = np.ones(g)
        alpha[[2, 3] if cls == 0 else [0, 1]] = 0
        alpha[4] = 0
        t = float(np.exp(-4 * grade + 0.1 * rng.standard_normal()))
        event = int(rng.uniform() < 0.8)
        t = t if event else t * float(rng.uniform(0.5, 1.0))
        for s in range(2 if p % 3 == 0 else 1):
            mix = np.zeros(g)
            on = alpha > 0
            mix[on] = (1 - 0.5 * grade) * rng.dirichlet(alpha[on])
            mix[4] = 0.5 * grade + 0.02
            mix /= mix.sum()
            n = int(rng.integers(n_range[0], n_range[1] + 1))
            types = rng.choice(g, size=n, p=mix)
            x = centres[types] + 2.4 * rng.standard_normal((n, d)) / np.sqrt(d)
            x[types == 4] += grade * direction
            sid = f"{pid}-01Z-00-DX{s + 1}"
            write_trident_h5(feats / f"{sid}.h5", x.astype(np.float32), grid_coords(n))
            rows.append((sid, pid, CLASSES[cls], round(t, 6), event, round(grade, 4)))
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "label", "time", "event", "grade"])
        w.writerows(rows)
    protos = out / "prototypes.safetensors"
    save_prototypes(protos, centres.astype(np.float32),
                    {"init": "planted", "seed": seed, "type_names": [f"type {i}" for i in range(g)]})
    return {"features": feats, "labels": labels, "prototypes": protos}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--patients", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    paths = planted_cohort(a.out, n_patients=a.patients, seed=a.seed)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()
