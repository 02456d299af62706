"""proalign-engine embed: feature files or slide files -> slide embeddings in a store."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..defaults import DEFAULT_PROALIGN, ROW_PRIOR, default_taus
from .app import RUNTIME_ERROR_EXIT, main
from .options import (apply_grid_preset, archive_opts, encoder_kwargs, encoder_opts, feature_entries, features_opts,
                      gpus_option, mpp_options, qc_opts, say_missing_mpp, with_options)


# Options of slide files only (--archive, or a slide manifest given as --manifest): refused with
# feature files, where they would do nothing.
slide_file_opts = archive_opts + encoder_opts + [
    click.option("--coords", "coords_dir", type=click.Path(exists=True, file_okay=False), default=None,
                 help="--archive: read TRIDENT/CLAM coords from this folder instead of detecting tissue."),
    click.option("--save-features", type=click.Path(file_okay=False), default=None,
                 help="--archive: also write TRIDENT-style per-slide features .h5 here."),
    click.option("--layout", type=click.Choice(["trident", "flat"]), default=None,
                 help="--save-features: trident (default) TRIDENT's job folders DIR/<mag>x_<patch>px_<overlap>px_"
                      "overlap/{patches,features_<encoder>}/ (what TRIDENT-based code such as PANTHER reads; "
                      "--features DIR reads them back), or flat DIR/<slide>.h5."),
    click.option("--edge-fill", type=click.Choice(["white", "black"]), default="white", show_default=True,
                 help="--archive: the pixels of edge patches beyond the slide; black is what TRIDENT reads."),
    click.option("--grid-preset", type=click.Choice(["trident"]), default=None,
                 help="--archive: trident = TRIDENT's grid: edge patches kept (corner inside), no minimum tissue "
                      "(--min-tissue 0); an explicit --min-tissue wins."),
    *qc_opts("--archive: "),
    click.option("--decoder", default="auto", show_default=True,
                 type=click.Choice(["auto", "cpu", "dali-cpu", "dali-gpu"])),
    click.option("--shrink-on-load", is_flag=True, help="--archive: half-size DCT decode of JPEG tiles when patches "
                                                        "are downsampled 2x or more (faster; mean |diff| ~0.5)."),
    click.option("--encoder-batch-size", "--batch-size", "batch_size", default=None, type=click.IntRange(1),
                 help="--archive: patches per encoder batch (default 256)."),
    click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                 help="Slides: copy each slide to this local folder before use (from network storage), deleted "
                      "once stored."),
    click.option("--cache-ahead", default=2, show_default=True, type=click.IntRange(0),
                 help="--cache-dir: how many slides (queue order) to copy ahead of the ones being embedded."),
    click.option("--keep-cache", is_flag=True, help="--cache-dir: keep the copies (a rerun reuses them)."),
]
# How patch features become an embedding, on either path.
aggregation_opts = [
    click.option("--prototypes", "prototypes", required=True, type=click.Path(dir_okay=False),
                 help="Prototype file (K, d)."),
    click.option("--out", required=True, type=click.Path(), help="The LMDB store (a folder); created if missing."),
    click.option("--method", default="proalign", show_default=True,
                 type=click.Choice(["proalign", "panther", "h2t", "protocount", "mean"])),
    click.option("--tau", multiple=True, type=click.FloatRange(0, min_open=True),
                 help=f"proalign: temperature(s); several give one row each. [{', '.join(map(str, default_taus()))}]"),
    click.option("--over", default=DEFAULT_PROALIGN["over"], show_default=True,
                 type=click.Choice(["patches", "prototypes"]),
                 help="proalign: softmax over patches (attention per prototype) or over prototypes (soft assignment)."),
    click.option("--moments", default=DEFAULT_PROALIGN["moments"], show_default=True, type=click.IntRange(1, 2),
                 help="proalign: 2 also stores each prototype's weighted variance (length K + 2Kd)."),
    click.option("--prior", multiple=True, type=click.FloatRange(0),
                 help="proalign --over prototypes: pseudo-patches at each prototype (shrinks rarely used ones); "
                      "one value for every row or one per --tau, in order [with the default temperatures "
                      f"{', '.join(map(str, DEFAULT_PROALIGN['prior']))}; with your own {ROW_PRIOR} per row; "
                      "with --over patches 0]."),
    click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
                 help="Stored embedding dtype."),
    click.option("--backend", default=None,
                 help="Aggregation backend (default: fastest live; see `doctor`)."),
    click.option("--panther-eps", default=1.0, show_default=True, type=float, help="panther: prior variance."),
    click.option("--panther-prior-strength", "--panther-prior", "panther_prior", default=1.0, show_default=True,
                 type=float, help="panther: prior strength of the MAP M-step (API: prior_strength)."),
    click.option("--encoder-id", default=None,
                 help="Encoder name recorded in provenance (default: the file's attribute)."),
]
# How the run goes: store, resume, shards, workers, retries, Ray.
run_opts = [
    click.option("--overwrite", is_flag=True,
                 help="Redo this run's slides already stored, with these options or others (else a store of other "
                      "options is refused)."),
    click.option("--on-change", default="redo", show_default=True, type=click.Choice(["redo", "keep", "fail"]),
                 help="A stored slide whose source file changed since (size or content fingerprint): embed it again, "
                      "keep its record, or stop before writing anything (exit 2). Listed in the run report either "
                      "way."),
    click.option("--report", type=click.Path(dir_okay=False), default=None, help="Run report JSON path."),
    click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."),
    click.option("--shard", default=None, metavar="I/N",
                 help="Only this node's share: slides whose id hashes to shard I of N (0 <= I < N)."),
    click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
                 help="Worker processes (or Ray actors); 1 embeds in this process."),
    click.option("--gpus", default=None, metavar="0,1,...",
                 help="One worker process per listed GPU (CUDA_VISIBLE_DEVICES set to it); replaces --workers."),
    click.option("--scheduler", default="local", show_default=True, type=click.Choice(["local", "ray"]),
                 help="local: this machine's processes; ray: Ray actors (pip install 'proalign-engine[ray]')."),
    click.option("--retries", default=1, show_default=True, type=click.IntRange(0),
                 help="Tries again for a slide that failed before it is quarantined."),
    click.option("--threads-per-worker", default=None, type=click.IntRange(1),
                 help="numba/torch threads per worker (default: cores / workers; in-process: all)."),
    click.option("--slide-timeout", default=None, type=click.FloatRange(0, min_open=True),
                 help="Seconds before a worker process stuck on one slide is killed (that try fails)."),
    click.option("--ray-address", default=None, help="Ray cluster (auto, ray://host:port); default: a local Ray."),
    click.option("--ray-cpus", default=1.0, show_default=True, type=float,
                 help="CPUs per Ray actor (fractions allowed)."),
    click.option("--ray-gpus", default=0.0, show_default=True, type=float, help="GPUs per Ray actor."),
]


@main.command()
@with_options(features_opts + slide_file_opts + aggregation_opts + run_opts)
@click.pass_context
def embed(ctx: click.Context, **kw):
    """Embed every slide's patch features (--features/--manifest), or every slide file of --archive
    (or of a slide manifest from `proalign-engine manifest`, given as --manifest) through
    --encoder/--weights, into the store at --out (resumable, idempotent).

    Exit code 0 when every slide is stored, 1 when any slide failed (quarantined: see the run
    report), 2 on a usage or store error, 3 when stopped early: by SIGINT/SIGTERM (the slides in
    flight are finished, or dropped on a second signal) or after 3 slides in a row failed to store
    (disk full?); rerun the same command to finish; 4 when an error inside the run stopped it."""
    from ..pipeline import embed_features

    archive, manifest, out = kw["archive"], kw["manifest"], kw["out"]
    slide_files = bool(archive) or _is_slide_manifest(manifest)
    if not slide_files:
        given = [name for name in _SLIDE_FILE_PARAMS if _given(ctx, name)]
        if given:
            flags = ", ".join(_flag(ctx, n) for n in given)
            raise click.UsageError(f"{flags} {'is' if len(given) == 1 else 'are'} for slide files (--archive or a "
                                   "slide manifest), not feature files")
    if (kw["cache_ahead"] != 2 or kw["keep_cache"]) and not kw["cache_dir"]:
        raise click.UsageError("--cache-ahead/--keep-cache go with --cache-dir")
    opts = _embed_options(kw)  # before _scheduling: --backend ray sets kw["scheduler"]
    scheduling = _scheduling(kw)
    try:
        if slide_files:
            from ..pipeline.slide_worker import embed_archive

            if kw["features"] or (archive and manifest):
                raise click.UsageError("give --archive, --manifest or --features, one of them")
            if not (kw["encoder"] and kw["weights"]):
                raise click.UsageError("slide files need --encoder and --weights")
            rule = mpp_options(kw["slide_mpp"], kw["mpp_csv"])
            mpp = dict(rule.table)
            if manifest:  # the recorded mpp and sizes; --slide-mpp/--mpp-csv fill slides without an mpp
                from ..slides.manifest import read_slide_manifest

                m = read_slide_manifest(manifest, mpp_table=rule.table)
                archive, mpp = m.entries, {}
                scheduling["duplicates"] = m.duplicates  # reported (and logged) by the run
            rep = embed_archive(archive, kw["encoder"], kw["weights"], kw["prototypes"], out, options=opts,
                                slide_options=_slide_options(kw), encoder_kwargs=encoder_kwargs(kw["encoder_args"]),
                                device=kw["device"], mpp=mpp, mpp_keys=rule.keys, overwrite=kw["overwrite"],
                                **scheduling)
        else:
            rep = embed_features(feature_entries(kw["features"], manifest), kw["prototypes"], out, opts,
                                 overwrite=kw["overwrite"], **scheduling)
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


def _is_slide_manifest(manifest) -> bool:
    from ..slides.manifest import is_slide_manifest

    return bool(manifest) and Path(manifest).is_file() and is_slide_manifest(manifest)


def _param_names(options) -> list[str]:
    return [p.name for p in click.command()(with_options(options)(lambda **_: None)).params]


# --device also places the aggregation of feature files (a GPU backend), so it is not slides-only
_SLIDE_FILE_PARAMS = [n for n in _param_names(slide_file_opts) if n not in ("archive", "device")]


def _given(ctx: click.Context, name: str) -> bool:
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _flag(ctx: click.Context, name: str) -> str:
    return next(p.opts[0] for p in ctx.command.params if p.name == name)


def _embed_options(kw: dict):
    """EmbedOptions from the aggregation options (a proalign option with another method is refused)."""
    from ..pipeline import EmbedOptions

    method, tau, prior = kw["method"], kw["tau"], kw["prior"]
    if method != "proalign" and (tau or kw["over"] != DEFAULT_PROALIGN["over"]
                                 or kw["moments"] != DEFAULT_PROALIGN["moments"] or prior):
        raise click.UsageError(f"--tau/--over/--moments/--prior are proalign options, not {method}'s")
    backend = kw["backend"]
    if backend == "ray":  # an older spelling: Ray schedules slides, it is no aggregation backend
        click.echo("note: --backend ray means --scheduler ray (the aggregation backend stays automatic); "
                   "write --scheduler ray", err=True)
        kw["scheduler"], backend = "ray", None
    try:
        return EmbedOptions(method=method, taus=tuple(tau) or default_taus(), over=kw["over"], moments=kw["moments"],
                            prior=(prior[0] if len(prior) == 1 else prior) if prior else None, dtype=kw["dtype"],
                            backend=backend, encoder_id=kw["encoder_id"], panther_eps=kw["panther_eps"],
                            panther_prior=kw["panther_prior"])
    except ValueError as e:  # e.g. --prior without --over prototypes
        raise click.UsageError(str(e)) from e


def _scheduling(kw: dict) -> dict:
    """run_archive's keyword arguments from the run options."""
    scheduling = dict(report_path=kw["report"], progress=kw["progress"], shard=kw["shard"], workers=kw["workers"],
                      scheduler=kw["scheduler"], on_change=kw["on_change"],
                      gpus=gpus_option(kw["gpus"], kw["scheduler"], kw["device"]), retries=kw["retries"],
                      threads=kw["threads_per_worker"], slide_timeout=kw["slide_timeout"],
                      ray_address=kw["ray_address"], ray_cpus=kw["ray_cpus"], ray_gpus=kw["ray_gpus"],
                      handle_signals=True)
    if kw["cache_dir"]:
        scheduling.update(cache_dir=kw["cache_dir"], cache_ahead=kw["cache_ahead"], keep_cache=kw["keep_cache"])
    return scheduling


def _slide_options(kw: dict):
    """SlideOptions (patching, decoding, saving features) from the slide-file options."""
    from ..pipeline.embed_slides import SlideOptions

    if kw["layout"] and not kw["save_features"]:
        raise click.UsageError("--layout is where --save-features writes: give --save-features DIR")
    edge, min_tissue = apply_grid_preset(kw["grid_preset"], "inside", kw["min_tissue"])
    return SlideOptions(magnification=kw["mag"], patch_size=kw["patch_size"], min_tissue=min_tissue, edge=edge,
                        decoder=kw["decoder"], shrink_on_load=kw["shrink_on_load"], batch_size=kw["batch_size"],
                        coords_dir=kw["coords_dir"], features_dir=kw["save_features"], layout=kw["layout"] or "trident",
                        edge_fill=kw["edge_fill"], keep_penmarks=kw["keep_penmarks"],
                        tissue_geojson=kw["tissue_geojson"], qc_dir=kw["qc_dir"])
