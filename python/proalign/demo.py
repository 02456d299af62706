"""`make demo`: a generated cohort of patch features -> prototypes -> ProAlign embeddings."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo", help="Folder for the demo cohort, prototypes and store.")
    ap.add_argument("--slides", type=int, default=24)
    args = ap.parse_args(argv)

    from .features import list_slides
    from .pipeline import EmbedOptions, embed_features
    from .prototypes.build import build_prototype_set
    from .prototypes.io import save_prototypes
    from .store import open_store
    from .synthetic import write_cohort

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    feats = out / "features_conch_v1"
    write_cohort(feats, n_slides=args.slides, d=512, seed=0)
    print(f"generated {args.slides} TRIDENT-style feature files (d=512) in {feats}")
    print("NOTE: these features are random vectors around planted clusters; the embeddings carry no "
          "biological meaning. They show the pipeline, not a result.")
    entries = list_slides(features=feats)
    ps = build_prototype_set(entries, init="kmeans", k=16, seed=0, pool_size=20_000)
    proto_path = out / "prototypes_k16.safetensors"
    h = save_prototypes(proto_path, ps.prototypes, ps.meta)
    print(f"prototypes: {proto_path} (K=16, spherical k-means on a {ps.meta['pool_size']}-patch pool, hash {h})")
    print("usage: " + " ".join(f"{u:.2f}" for u in ps.usage))
    store_path = out / "embeddings.lmdb"
    rep = embed_features(entries, proto_path, store_path, EmbedOptions(method="proalign", taus=(0.1,)), progress=False)
    print(f"store: {store_path.resolve()}")
    print(rep.summary())
    with open_store(store_path) as s:
        first = next(iter(s))
        e = s[first].astype(np.float32)
        print(f"{len(s)} slides stored; {first}: embedding {e.shape} ({s.meta(first)['n_patches']} patches), "
              "pi = " + " ".join(f"{v:.3f}" for v in e[:16]))
    print(f"run report: {rep.report_path}")
    print(f"next: proalign-engine store ls {store_path}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
