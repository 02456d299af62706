"""proalign-engine embed: feature files or slide files -> slide embeddings in a store."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..defaults import DEFAULT_PROALIGN, ROW_PRIOR, default_taus
from .app import RUNTIME_ERROR_EXIT, main
from .options import (apply_grid_preset, archive_opts, encoder_kwargs, encoder_opts, feature_entries, features_opts,
                      gpus_option, mpp_options, qc_opts, say_missing_mpp, with_options)


@main.command()
@with_options(features_opts + archive_opts + encoder_opts)
@click.option("--coords", "coords_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="--archive: read TRIDENT/CLAM coords from this folder instead of detecting tissue.")
@click.option("--save-features", type=click.Path(file_okay=False), default=None,
              help="--archive: also write TRIDENT-style per-slide features .h5 here.")
@click.option("--layout", type=click.Choice(["flat", "trident"]), default="flat", show_default=True,
              help="--save-features: flat DIR/<slide>.h5, or TRIDENT's job folders DIR/<mag>x_<patch>px_<overlap>px_"
                   "overlap/{patches,features_<encoder>}/ (what TRIDENT-based code such as PANTHER reads).")
@click.option("--edge-fill", type=click.Choice(["white", "black"]), default="white", show_default=True,
              help="--archive: the pixels of edge patches beyond the slide; black is what TRIDENT reads.")
@click.option("--grid-preset", type=click.Choice(["trident"]), default=None,
              help="--archive: trident = TRIDENT's grid: edge patches kept (corner inside), no minimum tissue "
                   "(--min-tissue 0); an explicit --min-tissue wins.")
@with_options(qc_opts("--archive: "))
@click.option("--decoder", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "dali-cpu", "dali-gpu"]))
@click.option("--shrink-on-load", is_flag=True, help="--archive: half-size DCT decode of JPEG tiles when patches "
                                                     "are downsampled 2x or more (faster; mean |diff| ~0.5).")
@click.option("--encoder-batch-size", "--batch-size", "batch_size", default=None, type=click.IntRange(1),
              help="--archive: patches per encoder batch (default 256).")
@click.option("--prototypes", "prototypes", required=True, type=click.Path(dir_okay=False), help="Prototype file (K, d).")
@click.option("--out", required=True, type=click.Path(), help="The LMDB store (a folder); created if missing.")
@click.option("--method", default="proalign", show_default=True,
              type=click.Choice(["proalign", "panther", "h2t", "protocount", "mean"]))
@click.option("--tau", multiple=True, type=click.FloatRange(0, min_open=True),
              help=f"proalign: temperature(s); several give one row each. [{', '.join(map(str, default_taus()))}]")
@click.option("--over", default=DEFAULT_PROALIGN["over"], show_default=True,
              type=click.Choice(["patches", "prototypes"]),
              help="proalign: softmax over patches (attention per prototype) or over prototypes (soft assignment).")
@click.option("--moments", default=DEFAULT_PROALIGN["moments"], show_default=True, type=click.IntRange(1, 2),
              help="proalign: 2 also stores each prototype's weighted variance (length K + 2Kd).")
@click.option("--prior", multiple=True, type=click.FloatRange(0),
              help="proalign --over prototypes: pseudo-patches at each prototype (shrinks rarely used ones); "
                   "one value for every row or one per --tau, in order [with the default temperatures "
                   f"{', '.join(map(str, DEFAULT_PROALIGN['prior']))}; with your own {ROW_PRIOR} per row; "
                   "with --over patches 0].")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Stored embedding dtype.")
@click.option("--backend", default=None,
              help="Aggregation backend (default: fastest live; see `doctor`).")
@click.option("--panther-eps", default=1.0, show_default=True, type=float, help="panther: prior variance.")
@click.option("--panther-prior-strength", "--panther-prior", "panther_prior", default=1.0, show_default=True,
              type=float, help="panther: prior strength of the MAP M-step (API: prior_strength).")
@click.option("--encoder-id", default=None, help="Encoder name recorded in provenance (default: the file's attribute).")
@click.option("--overwrite", is_flag=True,
              help="Redo this run's slides already stored, with these options or others (else a store of other "
                   "options is refused).")
@click.option("--on-change", default="redo", show_default=True, type=click.Choice(["redo", "keep", "fail"]),
              help="A stored slide whose source file changed since (size or content fingerprint): embed it again, "
                   "keep its record, or stop before writing anything (exit 2). Listed in the run report either way.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Run report JSON path.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@click.option("--shard", default=None, metavar="I/N",
              help="Only this node's share: slides whose id hashes to shard I of N (0 <= I < N).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="Worker processes (or Ray actors); 1 embeds in this process.")
@click.option("--gpus", default=None, metavar="0,1,...",
              help="One worker process per listed GPU (CUDA_VISIBLE_DEVICES set to it); replaces --workers.")
@click.option("--scheduler", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: this machine's processes; ray: Ray actors (pip install 'proalign-engine[ray]').")
@click.option("--retries", default=1, show_default=True, type=click.IntRange(0),
              help="Tries again for a slide that failed before it is quarantined.")
@click.option("--threads-per-worker", default=None, type=click.IntRange(1),
              help="numba/torch threads per worker (default: cores / workers; in-process: all).")
@click.option("--slide-timeout", default=None, type=click.FloatRange(0, min_open=True),
              help="Seconds before a worker process stuck on one slide is killed (that try fails).")
@click.option("--ray-address", default=None, help="Ray cluster (auto, ray://host:port); default: a local Ray.")
@click.option("--ray-cpus", default=1.0, show_default=True, type=float, help="CPUs per Ray actor (fractions allowed).")
@click.option("--ray-gpus", default=0.0, show_default=True, type=float, help="GPUs per Ray actor.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Slides: copy each slide to this local folder before use (from network storage), deleted "
                   "once stored.")
@click.option("--cache-ahead", default=2, show_default=True, type=click.IntRange(0),
              help="--cache-dir: how many slides (queue order) to copy ahead of the ones being embedded.")
@click.option("--keep-cache", is_flag=True, help="--cache-dir: keep the copies (a rerun reuses them).")
def embed(features, manifest, archive, slide_mpp, mpp_csv, mag, patch_size, min_tissue, encoder, weights, encoder_args,
          device, coords_dir, save_features, decoder, shrink_on_load, batch_size, prototypes, out, method, tau, over,
          moments, prior, dtype, backend, panther_eps, panther_prior, encoder_id, overwrite, on_change, report, progress,
          shard, workers, gpus, scheduler, retries, threads_per_worker, slide_timeout, ray_address, ray_cpus, ray_gpus,
          cache_dir, cache_ahead, keep_cache, layout, edge_fill, grid_preset, qc_dir, tissue_geojson,
          keep_penmarks):
    """Embed every slide's patch features (--features/--manifest), or every slide file of --archive
    (or of a slide manifest from `proalign-engine manifest`, given as --manifest) through
    --encoder/--weights, into the store at --out (resumable, idempotent).

    Exit code 0 when every slide is stored, 1 when any slide failed (quarantined: see the run
    report), 2 on a usage or store error, 3 when stopped early: by SIGINT/SIGTERM (the slides in
    flight are finished, or dropped on a second signal) or after 3 slides in a row failed to store
    (disk full?); rerun the same command to finish."""
    from ..pipeline import EmbedOptions, embed_features
    from ..slides.manifest import is_slide_manifest

    slide_manifest = bool(manifest) and Path(manifest).is_file() and is_slide_manifest(manifest)
    if cache_dir and not (archive or slide_manifest):
        raise click.UsageError("--cache-dir is for slide files (--archive or a slide manifest), not feature files")
    if (cache_ahead != 2 or keep_cache) and not cache_dir:
        raise click.UsageError("--cache-ahead/--keep-cache go with --cache-dir")
    if backend == "ray":  # an older spelling: Ray schedules slides, it is no aggregation backend
        click.echo("note: --backend ray means --scheduler ray (the aggregation backend stays automatic); "
                   "write --scheduler ray", err=True)
        scheduler, backend = "ray", None
    if method != "proalign" and (tau or over != DEFAULT_PROALIGN["over"] or moments != DEFAULT_PROALIGN["moments"]
                                 or prior):
        raise click.UsageError(f"--tau/--over/--moments/--prior are proalign options, not {method}'s")
    try:
        opts = EmbedOptions(method=method, taus=tuple(tau) or default_taus(), over=over, moments=moments,
                            prior=(prior[0] if len(prior) == 1 else prior) if prior else None, dtype=dtype,
                            backend=backend,
                            encoder_id=encoder_id, panther_eps=panther_eps, panther_prior=panther_prior)
    except ValueError as e:  # e.g. --prior without --over prototypes
        raise click.UsageError(str(e)) from e
    scheduling = dict(report_path=report, progress=progress, shard=shard, workers=workers, scheduler=scheduler,
                      on_change=on_change, gpus=gpus_option(gpus, scheduler, device),
                      retries=retries, threads=threads_per_worker, slide_timeout=slide_timeout,
                      ray_address=ray_address, ray_cpus=ray_cpus, ray_gpus=ray_gpus, handle_signals=True)
    if cache_dir:
        scheduling.update(cache_dir=cache_dir, cache_ahead=cache_ahead, keep_cache=keep_cache)
    try:
        if archive or slide_manifest:
            from ..pipeline.embed_slides import SlideOptions
            from ..pipeline.slide_worker import embed_archive
            if features or (archive and manifest):
                raise click.UsageError("give --archive, --manifest or --features, one of them")
            if not (encoder and weights):
                raise click.UsageError("slide files need --encoder and --weights")
            rule = mpp_options(slide_mpp, mpp_csv)
            mpp = dict(rule.table)
            if slide_manifest:  # the recorded mpp and sizes; --slide-mpp/--mpp-csv fill slides without an mpp
                from ..slides.manifest import read_slide_manifest

                m = read_slide_manifest(manifest, mpp_table=rule.table)
                archive, mpp = m.entries, {}
                scheduling["duplicates"] = m.duplicates  # reported (and logged) by the run
            if layout != "flat" and not save_features:
                raise click.UsageError("--layout is where --save-features writes: give --save-features DIR")
            edge, min_tissue = apply_grid_preset(grid_preset, "inside", min_tissue)
            sopts = SlideOptions(magnification=mag, patch_size=patch_size, min_tissue=min_tissue, edge=edge,
                                 decoder=decoder, shrink_on_load=shrink_on_load, batch_size=batch_size,
                                 coords_dir=coords_dir, features_dir=save_features, layout=layout,
                                 edge_fill=edge_fill, keep_penmarks=keep_penmarks, tissue_geojson=tissue_geojson,
                                 qc_dir=qc_dir)
            rep = embed_archive(archive, encoder, weights, prototypes, out, options=opts, slide_options=sopts,
                                encoder_kwargs=encoder_kwargs(encoder_args), device=device, mpp=mpp,
                                mpp_keys=rule.keys, overwrite=overwrite, **scheduling)
        else:
            if layout != "flat" or edge_fill != "white" or grid_preset or qc_dir or tissue_geojson or keep_penmarks:
                raise click.UsageError("--layout, --edge-fill, --grid-preset, --qc, --tissue-geojson and "
                                       "--keep-penmarks are for slide files (--archive)")
            rep = embed_features(feature_entries(features, manifest), prototypes, out, opts, overwrite=overwrite,
                                 **scheduling)
    except ValueError as e:  # the inputs or options, found unusable before or while starting the run
        raise click.UsageError(str(e)) from e
    except RuntimeError as e:  # inside the run (torch, Ray, the machine): not the command line's fault
        click.echo(f"error: the run stopped: {e}", err=True)
        sys.exit(RUNTIME_ERROR_EXIT)
    click.echo(f"store: {Path(out).resolve()}")
    click.echo(rep.summary())
    for sid, what in rep.changed_sources.items():
        click.echo(f"SOURCE CHANGED {sid}: {what}" + (" (record kept)" if rep.on_change == "keep" else ""), err=True)
    for sid, why in say_missing_mpp(rep.failed).items():
        click.echo(f"FAILED {sid}: {why}", err=True)
    click.echo(f"report: {rep.report_path}")
    sys.exit(rep.exit_code)
