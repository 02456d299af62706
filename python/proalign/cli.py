"""The `proalign-engine` command line."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__
from .errors import ProAlignError


def _entries(features, manifest):
    from .features import list_slides

    if (features is None) == (manifest is None):
        raise click.UsageError("give exactly one of --features DIR or --manifest CSV")
    try:
        entries = list_slides(features=features, manifest=manifest)
    except (OSError, ValueError) as e:
        raise click.UsageError(str(e)) from e
    if not entries:
        raise click.UsageError(f"no .h5 or .pt feature files found in {features or manifest}")
    return entries


class _Group(click.Group):
    """Turns our own errors into one clear line and exit code 2 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ProAlignError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="proalign-engine")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """ProAlign slide embeddings for whole-slide-image archives."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


features_opts = [
    click.option("--features", type=click.Path(file_okay=False), help="Folder of per-slide .h5/.pt feature files."),
    click.option("--manifest", type=click.Path(dir_okay=False), help="CSV with columns slide_id,path instead of a folder."),
]


def _with(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


@main.command()
@_with(features_opts)
@click.option("--prototypes", "prototypes", required=True, type=click.Path(dir_okay=False), help="Prototype file (K, d).")
@click.option("--out", required=True, type=click.Path(), help="The LMDB store (a folder); created if missing.")
@click.option("--method", default="proalign", show_default=True,
              type=click.Choice(["proalign", "panther", "h2t", "protocount", "mean"]))
@click.option("--tau", multiple=True, type=float, help="Attention temperature(s); several give one row each. [0.1]")
@click.option("--over", default="patches", show_default=True, type=click.Choice(["patches", "prototypes"]))
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Stored embedding dtype.")
@click.option("--backend", default=None, help="Aggregation backend (default: fastest live; see `doctor`).")
@click.option("--panther-eps", default=1.0, show_default=True, type=float, help="panther: prior variance.")
@click.option("--panther-prior", default=1.0, show_default=True, type=float, help="panther: prior strength tau.")
@click.option("--encoder-id", default=None, help="Encoder name recorded in provenance (default: the file's attribute).")
@click.option("--overwrite", is_flag=True, help="Redo slides already stored with the same options.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Run report JSON path.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def embed(features, manifest, prototypes, out, method, tau, over, dtype, backend, panther_eps, panther_prior, encoder_id,
          overwrite, report, progress):
    """Embed every slide's patch features into the store at --out (resumable, idempotent).

    Exit code 0 when every slide is stored, 1 when any slide failed (see the run report)."""
    from .pipeline import EmbedOptions, embed_features

    opts = EmbedOptions(method=method, taus=tuple(tau) or (0.1,), over=over, dtype=dtype, backend=backend,
                        encoder_id=encoder_id, panther_eps=panther_eps, panther_prior=panther_prior)
    try:
        rep = embed_features(_entries(features, manifest), prototypes, out, opts, overwrite=overwrite,
                             report_path=report, progress=progress)
    except (ValueError, RuntimeError) as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"store: {Path(out).resolve()}")
    click.echo(rep.summary())
    for sid, why in rep.failed.items():
        click.echo(f"FAILED {sid}: {why}", err=True)
    click.echo(f"report: {rep.report_path}")
    sys.exit(0 if rep.ok else 1)


@main.group()
def prototypes():
    """Build prototype sets."""


@prototypes.command("build")
@_with(features_opts)
@click.option("--init", "init", default="kmeans", show_default=True, type=click.Choice(["kmeans", "text", "file"]))
@click.option("--k", default=16, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--pool-size", default=100_000, show_default=True, type=click.IntRange(1))
@click.option("--text-prototypes", type=click.Path(dir_okay=False), help="init=text: text prototypes t_k (K, D).")
@click.option("--projection", type=click.Path(dir_okay=False), help="init=text: projection W (d, D), z = x W.")
@click.option("--tau-a", default=0.01, show_default=True, type=float, help="init=text: allocation temperature.")
@click.option("--top-fraction", default=0.01, show_default=True, type=float, help="init=text: M_k as a pool fraction.")
@click.option("--from", "from_file", type=click.Path(dir_okay=False), help="init=file: prototype file to start from.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors or .npz.")
@click.option("--force", is_flag=True, help="Save even a collapsed set.")
def prototypes_build(features, manifest, init, k, seed, pool_size, text_prototypes, projection, tau_a, top_fraction,
                     from_file, out, force):
    """Build a prototype set from a cohort's features (METHOD.md Step 3)."""
    from .prototypes.build import build_prototype_set
    from .prototypes.io import read_matrix, read_prototype_file, save_prototypes

    entries = _entries(features, manifest)
    text = read_prototype_file(text_prototypes)[0] if text_prototypes else None
    proj = read_matrix(projection) if projection else None
    initial = read_prototype_file(from_file)[0] if from_file else None
    ps = build_prototype_set(entries, init=init, k=k, seed=seed, pool_size=pool_size, text_prototypes=text,
                             projection=proj, tau_a=tau_a, top_fraction=top_fraction, initial=initial)
    click.echo(f"pool: {ps.meta['pool_size']} patches from {ps.meta['n_slides']} slides "
               f"({len(ps.meta['skipped_slides'])} skipped)")
    for sid, why in ps.meta["skipped_slides"].items():
        click.echo(f"skipped {sid}: {why}", err=True)
    click.echo("usage per prototype: " + " ".join(f"{j}:{u:.3f}" for j, u in enumerate(ps.usage)))
    if ps.collapsed and not force:
        click.echo(f"error: collapsed prototype set: prototypes {ps.collapsed} have < 0.1% usage; "
                   f"not saved (use --force to save anyway)", err=True)
        sys.exit(1)
    h = save_prototypes(out, ps.prototypes, {**ps.meta, "engine_version": __version__})
    click.echo(f"wrote {out} (K={ps.prototypes.shape[0]}, d={ps.prototypes.shape[1]}, hash {h})")


@main.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--mag", "mag", type=float, default=None, help="Target magnification (default 20 unless --mpp).")
@click.option("--mpp", "target_mpp", type=float, default=None, help="Target microns per pixel instead of --mag.")
@click.option("--patch-size", default=256, show_default=True, type=click.IntRange(1), help="Pixels at the target.")
@click.option("--overlap", default=0, show_default=True, type=click.IntRange(0), help="Pixels shared by neighbours.")
@click.option("--min-tissue", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Minimum tissue fraction of a patch.")
@click.option("--edge", default="inside", show_default=True, type=click.Choice(["inside", "pad"]),
              help="inside: patches wholly inside the slide; pad: TRIDENT/CLAM's corner-inside rule.")
@click.option("--slide-mpp", type=float, default=None, help="Level-0 mpp for slides without one (TCGA has none).")
@click.option("--mpp-csv", type=click.Path(exists=True, dir_okay=False), help="Per-slide mpp: columns wsi,mpp.")
@click.option("--out", required=True, type=click.Path(),
              help="coords .h5 for one slide, else a job folder: OUT/patches/<slide>_patches.h5 (TRIDENT layout).")
def patch(slides, mag, target_mpp, patch_size, overlap, min_tissue, edge, slide_mpp, mpp_csv, out):
    """Tissue detection and a patch grid per slide, written as TRIDENT coords .h5. Exit 1 when a
    slide failed (the others are still written)."""
    from .slides.coords_io import trident_coords_path, write_coords_h5
    from .slides.patching import patch_slide, read_mpp_csv

    if mag is not None and target_mpp is not None:
        raise click.UsageError("give --mag or --mpp, not both")
    single = len(slides) == 1 and out.endswith(".h5")
    per_slide = read_mpp_csv(mpp_csv) if mpp_csv else {}
    failed = 0
    for path in slides:
        p = Path(path)
        mpp = per_slide.get(p.name, per_slide.get(p.stem, slide_mpp))
        try:
            slide, grid = patch_slide(p, mpp=mpp, patch_size=patch_size, target_magnification=mag,
                                      target_mpp=target_mpp, overlap=overlap, min_tissue=min_tissue, edge=edge)
            dest = Path(out) if single else trident_coords_path(out, p.stem)
            write_coords_h5(dest, grid, name=p.stem)
            slide.close()
        except ProAlignError as e:
            failed += 1
            click.echo(f"FAILED: {e}", err=True)
            continue
        click.echo(f"{p.name}: {len(grid)} patches of {grid.patch_size_level0} px at level 0, read at level "
                   f"{grid.level} ({grid.read_size} px) -> {dest}")
    if failed:
        click.echo(f"{failed} of {len(slides)} slides failed", err=True)
        sys.exit(1)


@main.group()
def store():
    """Inspect, export and verify an embedding store."""


@store.command("ls")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def store_ls(path):
    """One line per slide: id, N, shape, method."""
    from .store import open_store

    with open_store(path) as s:
        for sid, rec in s.items():
            click.echo(f"{sid}\tN={rec.n_patches}\tshape={tuple(rec.embedding.shape)}\t{rec.meta.get('method')}")
        click.echo(f"{len(s)} slides", err=True)


@store.command("show")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("slide_id")
def store_show(path, slide_id):
    """Provenance and a preview of one slide's embedding."""
    from .store import open_store

    with open_store(path) as s:
        if slide_id not in s:
            raise click.ClickException(f"slide {slide_id!r} is not in {path}")
        rec = s.record(slide_id)
    click.echo(json.dumps({**rec.meta, "n_patches": rec.n_patches}, indent=2))
    e = rec.embedding.astype(np.float32)
    click.echo(f"embedding: shape {e.shape} {rec.embedding.dtype}, first values {np.round(e.ravel()[:6], 4).tolist()}")


@store.command("export")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", required=True, type=click.Choice(["npy", "parquet", "h5"]))
@click.option("--out", required=True, type=click.Path(), help="File (npy, parquet) or folder (h5).")
def store_export(path, fmt, out):
    """Export to .npy (+ ids), parquet, or TRIDENT-style slide_features .h5 files."""
    from .store import open_store
    from .store.export import export_store

    with open_store(path) as s:
        written = export_store(s, fmt, out)
    click.echo(f"wrote {len(written)} file(s) under {Path(out).resolve()}")


@store.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def store_verify(path):
    """Check every record; exit 1 when any is damaged."""
    from .store import open_store
    from .store.export import verify_store

    with open_store(path) as s:
        n = len(s)
        problems = verify_store(s)
    for sid, why in problems.items():
        click.echo(f"BAD {sid}: {why}", err=True)
    click.echo(f"{n - len(problems)} of {n} records OK")
    sys.exit(1 if problems else 0)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json):
    """Versions, live backends and devices, and why the others are not live."""
    from .doctor import report

    r = report()
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"proalign-engine {__version__}  python {r['python']}  {r['platform']}")
    for p, v in r["packages"].items():
        click.echo(f"  {p:12s} {v}")
    click.echo(f"  {'proalign._C':12s} {r['native_module']}")
    click.echo(f"devices: cuda={r['devices']['cuda']} {r['devices']['cuda_devices']}")
    for name, b in r["backends"].items():
        click.echo(f"backend {name:8s} {'live' if b['live'] else 'off: ' + b['why_not']}  methods={','.join(b['methods'])}")


if __name__ == "__main__":
    main()
