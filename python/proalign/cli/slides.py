"""proalign-engine manifest and patch: what is in an archive, and its patch grids."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from ..errors import ProAlignError
from .app import main
from .options import apply_grid_preset, mpp_keys_opt, mpp_options, qc_opts, with_options


class _ManifestProgress:
    """Slides probed, shown as embed shows its progress: a tqdm bar on a terminal (or with
    --progress), plain log lines otherwise (each 5% of the slides, after 30 s without one, at the end)."""

    def __init__(self, enabled: bool | None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar, self.last = None, 0.0

    def update(self, done: int, total: int) -> None:
        import time

        if self.enabled:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="slide", dynamic_ncols=True)
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if done == total or done % max(1, total // 20) == 0 or now - self.last > 30:
            self.last = now
            logging.getLogger("proalign.manifest").info("[%d/%d] slides probed", done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@main.command("manifest")
@click.option("--archive", required=True, type=click.Path(exists=True, file_okay=False), help="Folder of slide files.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The manifest CSV to write.")
@click.option("--slide-mpp", type=float, default=None, help="Level-0 mpp for every slide (as embed --slide-mpp).")
@click.option("--mpp-csv", type=click.Path(exists=True, dir_okay=False), help="Per-slide mpp: columns wsi,mpp.")
@mpp_keys_opt
@click.option("--workers", default=None, type=click.IntRange(1), help="Processes reading metadata (default: cores).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def manifest_cmd(archive, out, slide_mpp, mpp_csv, workers, progress):
    """List an archive once: one CSV row per slide file (slide_id, path, size_bytes, format, width,
    height, levels, mpp, mpp_source, objective_power, magnification, status, error), from each slide's metadata
    only (no pixels), read by a process pool. Slides that do not open are listed with the reason
    (status error). `embed --manifest OUT` then reuses it: no listing, no mpp lookups."""
    from ..slides.manifest import build_manifest
    from ..slides.mpp import missing_mpp_summary

    rule = mpp_options(slide_mpp, mpp_csv)
    shown = _ManifestProgress(progress)
    try:
        rows = build_manifest(archive, out, mpp_table=rule.table, workers=workers, progress=shown.update,
                              mpp_keys=rule.keys)
    finally:
        shown.close()
    if not rows:
        raise click.UsageError(f"no slide files found under {archive}")
    bad = [r for r in rows if r["status"] != "ok"]
    no_mpp = [r for r in rows if r["status"] == "ok" and not r["mpp"]]
    for r in bad:
        click.echo(f"{r['status'].upper()} {r['path']}: {r['error']}", err=True)
    click.echo(f"wrote {out}: {len(rows)} slides, {len(rows) - len(bad)} readable, {len(bad)} not "
               f"({sum(int(r['size_bytes'] or 0) for r in rows) / 2**30:.2f} GiB)")
    if no_mpp:
        click.echo(missing_mpp_summary([r["slide_id"] for r in no_mpp]) + " (here or to embed)", err=True)


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
@mpp_keys_opt
@click.option("--grid-preset", type=click.Choice(["trident"]), default=None,
              help="trident = TRIDENT's grid: --edge pad --min-tissue 0 (an explicit --edge/--min-tissue wins).")
@click.option("--out", required=True, type=click.Path(),
              help="coords .h5 for one slide, else a job folder (see --layout).")
@click.option("--layout", type=click.Choice(["trident", "flat"]), default=None,
              help="Job folder: trident (default) OUT/<mag>x_<patch>px_<overlap>px_overlap/patches/<slide>_patches.h5, "
                   "TRIDENT's folders (what PANTHER and other TRIDENT-based code read); flat OUT/patches/"
                   "<slide>_patches.h5.")
@with_options(qc_opts(""))
@click.option("--dump-patches", default=0, show_default=True, type=click.IntRange(0), metavar="N",
              help="Write a sample of N patch images per slide (PNG): QC/<slide>_patches/ with --qc, else "
                   "<job>/dump_patches/<slide>/.")
def patch(slides, mag, target_mpp, patch_size, overlap, min_tissue, edge, slide_mpp, mpp_csv, out, grid_preset,
          layout, qc_dir, tissue_geojson, keep_penmarks, dump_patches):
    """Tissue detection and a patch grid per slide, written as TRIDENT coords .h5. Exit 1 when a
    slide failed (the others are still written)."""
    from ..slides.coords_io import trident_coords_path, trident_job_name, write_coords_h5
    from ..slides.patching import patch_slide

    if mag is not None and target_mpp is not None:
        raise click.UsageError("give --mag or --mpp, not both")
    single = len(slides) == 1 and out.endswith(".h5")
    if single and layout:
        raise click.UsageError(f"--layout {layout} lays out a job folder; --out {out} is one coords file")
    layout = layout or "trident"
    edge, min_tissue = apply_grid_preset(grid_preset, edge, min_tissue)
    job = Path(out)
    if layout == "trident":  # the folder is named by the request, as TRIDENT's is (--mpp: 10 / mpp)
        job = job / trident_job_name(mag if mag is not None else 10.0 / target_mpp if target_mpp else 20.0,
                                     patch_size, overlap)
    rule = mpp_options(slide_mpp, mpp_csv)
    failed, no_mpp = 0, []
    for path in slides:
        p = Path(path)
        mpp = rule.user_mpp(p)
        try:
            slide, grid = patch_slide(p, mpp=mpp, patch_size=patch_size, target_magnification=mag,
                                      target_mpp=target_mpp, overlap=overlap, min_tissue=min_tissue, edge=edge,
                                      mpp_keys=rule.keys, keep_penmarks=keep_penmarks, tissue_geojson=tissue_geojson,
                                      qc_dir=qc_dir, slide_id=p.stem)
            dest = Path(out) if single else trident_coords_path(job, p.stem)
            write_coords_h5(dest, grid, name=p.stem)
            if dump_patches:
                from ..slides.qc import dump_patches as _dump

                ddir = (Path(qc_dir) / f"{p.stem}_patches" if qc_dir
                        else (dest.parent if single else job) / "dump_patches" / p.stem)
                _dump(slide, grid, dump_patches, ddir)
            slide.close()
        except ProAlignError as e:
            from ..slides.mpp import is_missing_mpp, without_fix

            failed += 1
            if is_missing_mpp(str(e)):  # the fix is said once, below
                no_mpp.append(p.stem)
            click.echo(f"FAILED: {without_fix(str(e))}", err=True)
            continue
        except Exception as e:  # a reader that let something else through: still this slide's problem
            failed += 1
            click.echo(f"FAILED: {p}: unexpected {type(e).__name__}: {e}", err=True)
            continue
        res = (f"; level 0: {grid.level0_mpp:.4g} um/px, {grid.level0_magnification:g}x"
               if grid.level0_mpp and grid.level0_magnification else "")
        click.echo(f"{p.name}: {len(grid)} patches of {grid.patch_size_level0} px at level 0, read at level "
                   f"{grid.level} ({grid.read_size} px{res}) -> {dest}")
    if no_mpp:
        from ..slides.mpp import missing_mpp_summary

        click.echo(missing_mpp_summary(no_mpp), err=True)
    if failed:
        click.echo(f"{failed} of {len(slides)} slides failed", err=True)
        sys.exit(1)
