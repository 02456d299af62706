"""`make demo`: two small end-to-end runs on generated data.

1. Features path: TRIDENT-style feature files -> k-means prototypes -> ProAlign embeddings.
2. Slides path: generated Aperio SVS slides -> tissue -> grid -> tile engine -> a CONCH v1-shaped
   model with RANDOM weights -> text prototypes from the shipped lung descriptions -> ProAlign
   embeddings. Random weights: the embeddings mean nothing; the run shows the machinery.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo", help="Folder for the demo cohort, prototypes and store.")
    ap.add_argument("--slides", type=int, default=24)
    ap.add_argument("--slide-files", type=int, default=4, help="Generated SVS slides for the slides path (0: skip).")
    args = ap.parse_args(argv)

    from .features import list_feature_files
    from .pipeline import EmbedOptions, embed_features
    from .prototypes.build import build_prototype_set
    from .prototypes.io import save_prototypes
    from .store import open_store
    from .testing.synthetic_features import write_cohort

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    feats = out / "features_conch_v1"
    write_cohort(feats, n_slides=args.slides, d=512, seed=0)
    print(f"generated {args.slides} TRIDENT-style feature files (d=512) in {feats}")
    print("NOTE: these features are random vectors around planted clusters; the embeddings carry no "
          "biological meaning. They show the pipeline, not a result.")
    entries = list_feature_files(features=feats)
    ps = build_prototype_set(entries, init="kmeans", k=16, seed=0, pool_size=20_000)
    proto_path = out / "prototypes_k16.safetensors"
    h = save_prototypes(proto_path, ps.prototypes, ps.meta)
    print(f"prototypes: {proto_path} (K=16, spherical k-means on a {ps.meta['pool_size']}-patch pool, hash {h})")
    print("usage: " + " ".join(f"{u:.2f}" for u in ps.usage))
    store_path = out / "embeddings.lmdb"
    rep = embed_features(entries, proto_path, store_path, EmbedOptions(method="proalign"), progress=False)
    print(f"store: {store_path.resolve()}")
    print(rep.summary())
    with open_store(store_path) as s:
        first = next(iter(s))
        e = np.atleast_2d(s[first].astype(np.float32))  # one row per tau
        print(f"{len(s)} slides stored; {first}: embedding {e.shape} ({s.meta(first)['n_patches']} patches), "
              f"pi (tau {s.meta(first)['taus'][0]}) = " + " ".join(f"{v:.3f}" for v in e[0, :16]))
    print(f"run report: {rep.report_path}")
    ok = rep.ok
    if args.slide_files:
        ok = _slides_demo(out, args.slide_files) and ok
    print("\nnext, on these outputs (each runs in seconds on a CPU):")
    for cmd in next_commands(out, slides=bool(args.slide_files), first=first):
        print(f"  {cmd}")
    return 0 if ok else 1


def next_commands(out: Path, *, slides: bool = True, first: str = "SYN-00-00000") -> list[str]:
    """Two or three `proalign-engine` commands a newcomer can run next on the demo's outputs in
    `out` (tests run them). The random-weight model folder records its architecture
    (proalign_encoder.json), so `--weights` on it needs no `--encoder-arg`."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    if not slides:
        return [f"proalign-engine store ls {q(out / 'embeddings.lmdb')}",
                f"proalign-engine store show {q(out / 'embeddings.lmdb')} {q(first)}"]
    return [f"proalign-engine heatmap {q(out / 'slides' / 'DEMO-00.svs')} --encoder conch_v1 "
            f"--weights {q(out / 'conch_v1_random')} --prototypes {q(out / 'prototypes_lung_text.safetensors')} "
            f"--descriptions lung --out {q(out / 'DEMO-00_heatmap.png')}",
            f"proalign-engine patch {q(out / 'slides' / 'DEMO-00.svs')} --out {q(out / 'job')}",
            f"proalign-engine store show {q(out / 'slide_embeddings.lmdb')} DEMO-00"]


def _slides_demo(out: Path, n: int) -> bool:
    from .encoders import create_encoder
    from .testing.random_weights import write_random_conch
    from .pipeline.slide_worker import embed_archive
    from .prototypes.build import prototypes_from_pool
    from .prototypes.from_slides import sample_slide_pool
    from .prototypes.io import save_prototypes
    from .prototypes.text import teacher
    from .slides.patching import list_slide_files
    from .testing.synthetic_slides import write_aperio_svs

    archive = out / "slides"
    archive.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_aperio_svs(archive / f"DEMO-{i:02d}.svs", 4000, 3000, tile=256, levels=(1, 4), seed=i, mpp=0.5,
                         app_mag=20, pen_marks=i == 0)
    print(f"\nslides path: {n} generated Aperio SVS slides (JPEG tiles, 20x) in {archive}")
    weights = out / "conch_v1_random"
    write_random_conch(weights)  # records its small architecture in proalign_encoder.json
    enc = create_encoder("conch_v1", weights)
    print(f"encoder: {enc!r} with RANDOM weights ({weights}; architecture in {weights / 'proalign_encoder.json'}): "
          "the embeddings below carry no meaning")
    pool = sample_slide_pool(list_slide_files(archive), enc, 2000, 0, patch_size=128)
    t = teacher(enc, "lung")
    ps = prototypes_from_pool(pool, "text", k=t.text.shape[0], seed=0, text_prototypes=t.text,
                              projection=t.projection, tau_a=t.tau_a)
    proto_path = out / "prototypes_lung_text.safetensors"
    save_prototypes(proto_path, ps.prototypes, {**ps.meta, "descriptions": "lung", "encoder": enc.name})
    print(f"prototypes: {proto_path} (init=text from the lung set, pool {len(pool.x)} patches)")
    from .pipeline.embed_slides import SlideOptions
    rep = embed_archive(archive, "conch_v1", weights, proto_path, out / "slide_embeddings.lmdb",
                        slide_options=SlideOptions(patch_size=128), progress=False)
    print(rep.summary())
    print(f"store: {(out / 'slide_embeddings.lmdb').resolve()}; run report: {rep.report_path}")
    return rep.ok


if __name__ == "__main__":
    sys.exit(main())
