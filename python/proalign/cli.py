"""The `proalign-engine` command line."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import numpy as np

from ._version import __version__
from .cli_common import encoder_kwargs, load_encoder
from .defaults import DEFAULT_PROALIGN, ROW_PRIOR, default_taus
from .errors import ProAlignError, StoreWriteError


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


RUNTIME_ERROR_EXIT = 4  # an error inside a run (what is stored stays); 2 is for the command line's


class _Group(click.Group):
    """Turns our own errors into one clear line instead of a traceback: exit code 3 for a store that
    could not be written (a full disk: rerun the same command once there is room), else 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StoreWriteError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(3)
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


encoder_opts = [
    click.option("--encoder", default=None, help="conch_v1, open_clip:<arch>, timm:<name> (see README)."),
    click.option("--weights", type=click.Path(exists=True), default=None, help="Local weights file or folder."),
    click.option("--encoder-arg", "encoder_args", multiple=True, metavar="KEY=VALUE",
                 help="Extra create_encoder argument (e.g. tokenizer=PATH); repeatable."),
    click.option("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when present)."),
]
def _keep_mpp_keys(ctx, param, value):
    # not a parameter of the commands: _mpp_rule reads it from the context (one rule for all of them)
    ctx.meta["custom_mpp_keys"] = value
    return value


mpp_keys_opt = click.option(
    "--custom-mpp-keys", metavar="KEY[,KEY]", multiple=True, expose_value=False, callback=_keep_mpp_keys,
    help="Slide properties holding the level-0 mpp under a non-standard name (e.g. aperio.ScanMPP or ScanMPP), "
         "read when the standard metadata has none.")
archive_opts = [
    click.option("--archive", type=click.Path(exists=True, file_okay=False),
                 help="Folder of slide files (searched recursively; a slide's id is its file name without the "
                      "extension, so two files with one id: the first in path order is used, the other reported)."),
    mpp_keys_opt,
    click.option("--slide-mpp", type=float, default=None, help="Level-0 mpp for slides without one."),
    click.option("--mpp-csv", type=click.Path(exists=True, dir_okay=False), help="Per-slide mpp: columns wsi,mpp."),
    click.option("--mag", type=float, default=None, help="Target magnification (default: the encoder's)."),
    click.option("--patch-size", type=click.IntRange(1), default=None, help="Patch px at --mag (default: encoder's)."),
    click.option("--min-tissue", default=0.1, show_default=True, type=click.FloatRange(0, 1)),
]


def qc_opts(scope: str) -> list:
    """Quality-control options of every command that makes a grid (`patch`, `embed --archive`);
    `scope` prefixes the help ("--archive: ")."""
    return [
        click.option("--qc", "qc_dir", type=click.Path(file_okay=False), default=None,
                     help=f"{scope}Per slide, a thumbnail with tissue contours, excluded regions and the patch grid "
                          "(QC/<slide>.png) and the contours as QuPath GeoJSON (QC/<slide>.geojson)."),
        click.option("--tissue-geojson", type=click.Path(exists=True, file_okay=False), default=None,
                     help=f"{scope}Use the (edited) contours DIR/<slide>.geojson instead of tissue detection "
                          "(holes respected)."),
        click.option("--keep-penmarks", is_flag=True,
                     help=f"{scope}Keep the patches under pen ink and blank/blurred tissue (excluded by default)."),
    ]


def _grid_preset(preset: str | None, edge: str, min_tissue: float) -> tuple[str, float]:
    """--grid-preset trident: TRIDENT's grid rule (edge pad: every patch whose top-left corner is in
    the slide; min tissue 0), for --edge/--min-tissue not given on the command line."""
    if preset is None:
        return edge, min_tissue
    from click.core import ParameterSource

    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)

    return (edge if given("edge") else "pad"), (min_tissue if given("min_tissue") else 0.0)


def _parse_gpus(text: str | None, scheduler: str, device: str | None = None) -> list[int] | None:
    """--gpus 0,1,3 -> [0, 1, 3], checked against the GPUs this machine has."""
    if text is None:
        return None
    if scheduler != "local":
        raise click.UsageError("--gpus is for the local scheduler; with Ray use --ray-gpus")
    if device is not None and device != "cuda":
        raise click.UsageError(f"--gpus gives each worker its own GPU as cuda; it cannot go with --device {device}")
    from .pipeline.scheduler import parse_gpus

    try:
        if not any(t.strip() for t in text.split(",")):
            raise ValueError(f"--gpus wants comma-separated GPU numbers, got {text!r}")
        import torch

        return parse_gpus(text, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _sample_pool(archive, features, manifest, enc, dev, pool_size, seed, mag, patch_size, min_tissue, slide_mpp,
                 mpp_csv):
    """The prototype pool: patches of slide files encoded on the fly (--archive), or rows of feature files."""
    from .prototypes.build import sample_pool

    if not archive:
        return sample_pool(_entries(features, manifest), pool_size, seed)
    from .prototypes.from_slides import sample_slide_pool
    from .slides.patching import list_slide_files

    paths = list_slide_files(archive)
    if not paths:
        raise click.UsageError(f"no slide files found under {archive}")
    rule = _mpp_rule(slide_mpp, mpp_csv)
    pool = sample_slide_pool(paths, enc, pool_size, seed, magnification=mag, patch_size=patch_size,
                             min_tissue=min_tissue, mpp_for=rule.user_mpp, device=dev, mpp_keys=rule.keys)
    _say_missing_mpp(pool.skipped)
    return pool


def _mpp_rule(slide_mpp, mpp_csv):
    """The mpp options of every command (--mpp-csv, --slide-mpp, --custom-mpp-keys) as one
    slides.mpp.MppRule: the user's mpp per slide (`user_mpp`) and the custom keys (`keys`)."""
    from .slides.mpp import mpp_rule

    ctx = click.get_current_context(silent=True)
    keys = ctx.meta.get("custom_mpp_keys") if ctx is not None else None
    return mpp_rule(mpp_csv=mpp_csv, slide_mpp=slide_mpp, custom_mpp_keys=keys)


def _say_missing_mpp(failed: dict) -> dict:
    """{slide id: reason} of a run -> the same with the missing-mpp fix left out of each reason,
    after saying, once, which slides have no mpp and how to give it."""
    from .slides.mpp import is_missing_mpp, missing_mpp_summary, without_fix

    missing = [sid for sid, why in failed.items() if is_missing_mpp(why)]
    if missing:
        click.echo(missing_mpp_summary(missing), err=True)
    return {sid: without_fix(why) if sid in missing else why for sid, why in failed.items()}


def _with(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


@main.command()
@_with(features_opts + archive_opts + encoder_opts)
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
@_with(qc_opts("--archive: "))
@click.option("--decoder", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "dali-cpu", "dali-gpu"]))
@click.option("--shrink-on-load", is_flag=True, help="--archive: half-size DCT decode of JPEG tiles when patches "
                                                     "are downsampled 2x or more (faster; mean |diff| ~0.5).")
@click.option("--batch-size", default=None, type=click.IntRange(1), help="--archive: encoder batch (default 256).")
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
@click.option("--panther-prior", default=1.0, show_default=True, type=float, help="panther: prior strength tau.")
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
    from .pipeline import EmbedOptions, embed_features
    from .slides.manifest import is_slide_manifest

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
                      on_change=on_change, gpus=_parse_gpus(gpus, scheduler, device),
                      retries=retries, threads=threads_per_worker, slide_timeout=slide_timeout,
                      ray_address=ray_address, ray_cpus=ray_cpus, ray_gpus=ray_gpus, handle_signals=True)
    if cache_dir:
        scheduling.update(cache_dir=cache_dir, cache_ahead=cache_ahead, keep_cache=keep_cache)
    try:
        if archive or slide_manifest:
            from .pipeline.embed_slides import SlideOptions
            from .pipeline.slide_worker import embed_archive
            if features or (archive and manifest):
                raise click.UsageError("give --archive, --manifest or --features, one of them")
            if not (encoder and weights):
                raise click.UsageError("slide files need --encoder and --weights")
            rule = _mpp_rule(slide_mpp, mpp_csv)
            mpp = dict(rule.table)
            if slide_manifest:  # the recorded mpp and sizes; --slide-mpp/--mpp-csv fill slides without an mpp
                from .slides.manifest import read_slide_manifest

                m = read_slide_manifest(manifest, mpp_table=rule.table)
                archive, mpp = m.entries, {}
                scheduling["duplicates"] = m.duplicates  # reported (and logged) by the run
            if layout != "flat" and not save_features:
                raise click.UsageError("--layout is where --save-features writes: give --save-features DIR")
            edge, min_tissue = _grid_preset(grid_preset, "inside", min_tissue)
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
            rep = embed_features(_entries(features, manifest), prototypes, out, opts, overwrite=overwrite,
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
    for sid, why in _say_missing_mpp(rep.failed).items():
        click.echo(f"FAILED {sid}: {why}", err=True)
    click.echo(f"report: {rep.report_path}")
    sys.exit(rep.exit_code)


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
    from .slides.manifest import build_manifest
    from .slides.mpp import missing_mpp_summary

    rule = _mpp_rule(slide_mpp, mpp_csv)
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
@click.option("--cohort", required=True, help='The cohort, e.g. "TCGA lung adenocarcinoma and squamous cell carcinoma".')
@click.option("--endpoint", required=True,
              help="OpenAI-compatible base URL (http://localhost:8000/v1) or the full .../chat/completions URL.")
@click.option("--model", required=True, help="Model name the server knows.")
@click.option("--k", default=16, show_default=True, type=click.IntRange(1, 256), help="Number of types.")
@click.option("--m", default=8, show_default=True, type=click.IntRange(1, 64), help="Descriptions per type.")
@click.option("--organ", default=None, help="Organ (default: the model's answer).")
@click.option("--name", "set_name", default=None, help="Set name (default: from the cohort).")
@click.option("--api-key-env", default=None, metavar="VAR", help="Environment variable holding the API key.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Output JSON file (default: stdout).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--retries", default=3, show_default=True, type=click.IntRange(0, 20))
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds per request.")
@click.option("--backoff", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Wait before the first retry after a server error (doubles each time).")
@click.option("--max-tokens", default=None, type=click.IntRange(1), help="Reply token limit (default: the server's).")
@click.option("--json-mode/--no-json-mode", default=True, show_default=True, help="Ask for response_format=json_object.")
def describe(cohort, endpoint, model, k, m, organ, set_name, api_key_env, out, seed, retries, timeout, backoff,
             max_tokens, json_mode):
    """Ask an LLM for a new description set (METHOD.md Step 1) and write its JSON.

    Temperature 0 and a fixed seed; the reply is validated against the schema, with bounded retries.
    Exit code 2 when the endpoint is unreachable, refuses the key, or gives no valid set."""
    import os

    from .prototypes.descriptions import description_set_hash, dumps, save_descriptions
    from .prototypes.descriptions.llm import DescribeError, DescribeSettings, generate_description_set

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise DescribeError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    settings = DescribeSettings(endpoint=endpoint, model=model, k=k, m=m, seed=seed, retries=retries, timeout=timeout,
                                backoff=backoff, api_key=api_key, json_mode=json_mode, max_tokens=max_tokens)
    data = generate_description_set(cohort, settings, organ=organ, name=set_name)
    if out:
        try:
            save_descriptions(data, out)
        except OSError as e:
            raise DescribeError(f"cannot write {out}: {e}") from e
        click.echo(f"wrote {out} ({data['name']}: K={k}, M={m}, hash {description_set_hash(data)}, "
                   f"{data['generator']['attempts']} attempt(s))", err=True)
    else:
        click.echo(dumps(data), nl=False)


@main.group()
def prototypes():
    """Build prototype sets."""


@prototypes.command("build")
@_with(features_opts + archive_opts + encoder_opts)
@click.option("--init", "init", default="kmeans", show_default=True, type=click.Choice(["kmeans", "text", "file"]))
@click.option("--k", default=16, show_default=True, type=click.IntRange(1), help="kmeans: number of prototypes.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--pool-size", default=100_000, show_default=True, type=click.IntRange(1))
@click.option("--descriptions", default=None, help="init=text: a shipped set (lung, breast, ...) or a JSON file.")
@click.option("--text-prototypes", type=click.Path(dir_okay=False), help="init=text: text prototypes t_k (K, D).")
@click.option("--projection", type=click.Path(dir_okay=False), help="init=text: projection W (d, D), z = x W.")
@click.option("--tau-a", default=None, type=float, help="init=text: allocation temperature [1/logit_scale, or 0.01].")
@click.option("--top-fraction", default=0.01, show_default=True, type=float, help="init=text: M_k as a pool fraction.")
@click.option("--from", "from_file", type=click.Path(dir_okay=False), help="init=file: prototype file to start from.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors or .npz.")
@click.option("--force", is_flag=True, help="Save even a collapsed set.")
def prototypes_build(features, manifest, archive, slide_mpp, mpp_csv, mag, patch_size, min_tissue, encoder, weights,
                     encoder_args, device, init, k, seed, pool_size, descriptions, text_prototypes, projection, tau_a,
                     top_fraction, from_file, out, force):
    """Build a prototype set from a cohort's features (--features/--manifest) or slides (--archive
    with --encoder/--weights) (METHOD.md Step 3)."""
    from .prototypes.build import prototypes_from_pool
    from .prototypes.io import read_prototype_file, save_prototypes
    from .prototypes.text import teacher

    enc = dev = None
    if encoder or archive:
        enc, dev = load_encoder(encoder, weights, encoder_args, device)
    pool = _sample_pool(archive, features, manifest, enc, dev, pool_size, seed, mag, patch_size, min_tissue,
                        slide_mpp, mpp_csv)
    meta_extra: dict = {}
    text = proj = None
    if init == "text":  # descriptions -> text prototypes, W, tau_a: the one recipe (prototypes.text.teacher)
        try:
            t = teacher(enc, descriptions, text_prototypes, projection, tau_a)
        except ValueError as e:
            raise click.UsageError(f"init=text: {e}") from e
        text, proj, tau_a, meta_extra = t.text, t.projection, t.tau_a, dict(t.meta)
    elif tau_a is None:
        tau_a = 0.01  # unused by the other initialisations; recorded as before
    if enc is not None:
        meta_extra["encoder"] = enc.name
    initial = read_prototype_file(from_file)[0] if from_file else None
    k = text.shape[0] if init == "text" else k
    ps = prototypes_from_pool(pool, init=init, k=k, seed=seed, text_prototypes=text, projection=proj, tau_a=tau_a,
                              top_fraction=top_fraction, initial=initial)
    click.echo(f"pool: {ps.meta['pool_size']} patches from {ps.meta['n_slides']} slides "
               f"({len(ps.meta['skipped_slides'])} skipped)")
    for sid, why in ps.meta["skipped_slides"].items():
        click.echo(f"skipped {sid}: {why}", err=True)
    click.echo("usage per prototype: " + " ".join(f"{j}:{u:.3f}" for j, u in enumerate(ps.usage)))
    if ps.collapsed and not force:
        click.echo(f"error: collapsed prototype set: prototypes {ps.collapsed} have < 0.1% usage; "
                   f"not saved (use --force to save anyway)", err=True)
        sys.exit(1)
    h = save_prototypes(out, ps.prototypes, {**ps.meta, **meta_extra, "engine_version": __version__})
    click.echo(f"wrote {out} (K={ps.prototypes.shape[0]}, d={ps.prototypes.shape[1]}, hash {h})")


@prototypes.command("train")
@_with(features_opts + archive_opts + encoder_opts)
@click.option("--from", "from_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The Step-3 initialisation (e.g. from `prototypes build --init text`).")
@click.option("--descriptions", default=None, help="Teacher text: a shipped set or a JSON file (with a VLM --encoder).")
@click.option("--text-prototypes", type=click.Path(exists=True, dir_okay=False),
              help="Teacher text prototypes t_k (K, D).")
@click.option("--projection", type=click.Path(exists=True, dir_okay=False),
              help="Projection W (d, D), z = normalize(x W).")
@click.option("--tau-a", default=None, type=float,
              help="Teacher temperature [the encoder's 1/logit_scale, else the --from file's, else 0.01].")
@click.option("--tau-s", default=0.05, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Student temperature.")
@click.option("--lambda", "lam", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Weight of the anti-collapse KL(mean p || mean q).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(0))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True),
              help="AdamW learning rate on unit-norm prototypes.")
@click.option("--batch-size", default=1024, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the pool and the batch order.")
@click.option("--pool-size", default=100_000, show_default=True, type=click.IntRange(1))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors or .npz.")
@click.option("--force", is_flag=True, help="Save even a collapsed set.")
def prototypes_train(features, manifest, archive, slide_mpp, mpp_csv, mag, patch_size, min_tissue, encoder, weights,
                     encoder_args, device, from_file, descriptions, text_prototypes, projection, tau_a, tau_s, lam,
                     epochs, lr, batch_size, seed, pool_size, out, force):
    """Refine a prototype set by patch-text contrast (METHOD.md Step 4) on a seeded pool of
    --features/--manifest rows or --archive slides. Prints the loss curve and the usage, refuses a
    collapsed set unless --force; the curve also goes to OUT.train.json."""
    from .prototypes.io import read_prototype_file
    from .prototypes.text import teacher
    from .prototypes.train import CollapsedSetError, save_trained, train_prototypes

    if not (text_prototypes or descriptions):
        raise click.UsageError("the teacher needs --text-prototypes T, or --descriptions with a vision-language "
                               "--encoder")
    if descriptions and not text_prototypes and not encoder:
        raise click.UsageError("--descriptions needs a vision-language --encoder/--weights for the text tower")
    if Path(out).suffix not in (".safetensors", ".npz"):
        raise click.UsageError(f"--out {out}: use a .safetensors or .npz file")
    enc = dev = None
    if encoder or archive:
        enc, dev = load_encoder(encoder, weights, encoder_args, device)
    init, init_meta = read_prototype_file(from_file)
    # what the file says about its types, from the initialisation, then the teacher (which wins)
    meta: dict = {k: init_meta[k] for k in ("descriptions", "descriptions_hash", "type_names", "encoder")
                  if k in init_meta}
    try:  # the teacher: the same recipe as prototypes build --init text; --from's tau_a if none else
        t = teacher(enc, descriptions, text_prototypes, projection, tau_a,
                    default_tau_a=float(init_meta.get("tau_a", 0.01)))
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    text, proj, tau_a = t.text, t.projection, t.tau_a
    known, theirs = meta.get("descriptions_hash"), t.meta.get("descriptions_hash")
    if known and theirs and known != theirs:
        click.echo(f"warning: --from was built from description set {meta.get('descriptions')!r} ({known}), the "
                   f"teacher is {t.meta.get('descriptions')!r} ({theirs}): type k may not be the same type in both",
                   err=True)
    meta.update(t.meta)
    pool = _sample_pool(archive, features, manifest, enc, dev, pool_size, seed, mag, patch_size, min_tissue,
                        slide_mpp, mpp_csv)
    click.echo(f"pool: {len(pool.x)} patches from {len(pool.slide_ids)} slides ({len(pool.skipped)} skipped)")
    for sid, why in pool.skipped.items():
        click.echo(f"skipped {sid}: {why}", err=True)
    res = train_prototypes(pool.x, None, text, proj, init, tau_s=tau_s, tau_a=tau_a, lam=lam, epochs=epochs, lr=lr,
                           batch_size=batch_size, seed=seed)
    tr = res.meta["train"]
    for row in res.loss_curve:
        click.echo(f"epoch {row['epoch']:3d}  total {row['total']:.5f}  ce {row['ce']:.5f}  kl {row['kl']:.6f}")
    click.echo(f"pool loss {tr['loss_before']['total']:.5f} -> {tr['loss_after']['total']:.5f}")
    click.echo("usage per prototype: " + " ".join(f"{j}:{u:.4f}" for j, u in enumerate(res.usage)))
    tr["from"] = {"path": str(Path(from_file).resolve()), "hash": tr["init_hash"], "init": init_meta.get("init")}
    meta.update(init="train", seed=seed, pool_size=len(pool.x), n_slides=len(pool.slide_ids),
                skipped_slides=pool.skipped, tau_a=tau_a, engine_version=__version__)
    if enc is not None:
        meta["encoder"] = enc.name
    try:
        h = save_trained(out, res, meta, force=force)
    except CollapsedSetError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"wrote {out} (K={res.prototypes.shape[0]}, d={res.prototypes.shape[1]}, hash {h}) "
               f"and {out}.train.json")


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
@click.option("--layout", type=click.Choice(["flat", "trident"]), default="flat", show_default=True,
              help="Job folder: flat OUT/patches/<slide>_patches.h5; trident OUT/<mag>x_<patch>px_<overlap>px_overlap/"
                   "patches/<slide>_patches.h5, TRIDENT's folders (what PANTHER and other TRIDENT-based code read).")
@_with(qc_opts(""))
@click.option("--dump-patches", default=0, show_default=True, type=click.IntRange(0), metavar="N",
              help="Write a sample of N patch images per slide (PNG): QC/<slide>_patches/ with --qc, else "
                   "<job>/dump_patches/<slide>/.")
def patch(slides, mag, target_mpp, patch_size, overlap, min_tissue, edge, slide_mpp, mpp_csv, out, grid_preset,
          layout, qc_dir, tissue_geojson, keep_penmarks, dump_patches):
    """Tissue detection and a patch grid per slide, written as TRIDENT coords .h5. Exit 1 when a
    slide failed (the others are still written)."""
    from .slides.coords_io import trident_coords_path, trident_job_name, write_coords_h5
    from .slides.patching import patch_slide

    if mag is not None and target_mpp is not None:
        raise click.UsageError("give --mag or --mpp, not both")
    single = len(slides) == 1 and out.endswith(".h5")
    if single and layout != "flat":
        raise click.UsageError(f"--layout {layout} lays out a job folder; --out {out} is one coords file")
    edge, min_tissue = _grid_preset(grid_preset, edge, min_tissue)
    job = Path(out)
    if layout == "trident":  # the folder is named by the request, as TRIDENT's is (--mpp: 10 / mpp)
        job = job / trident_job_name(mag if mag is not None else 10.0 / target_mpp if target_mpp else 20.0,
                                     patch_size, overlap)
    rule = _mpp_rule(slide_mpp, mpp_csv)
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
                from .slides.qc import dump_patches as _dump

                ddir = (Path(qc_dir) / f"{p.stem}_patches" if qc_dir
                        else (dest.parent if single else job) / "dump_patches" / p.stem)
                _dump(slide, grid, dump_patches, ddir)
            slide.close()
        except ProAlignError as e:
            from .slides.mpp import is_missing_mpp, without_fix

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
        from .slides.mpp import missing_mpp_summary

        click.echo(missing_mpp_summary(no_mpp), err=True)
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


@store.command("merge")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def store_merge(out, shards):
    """Join shard stores into OUT (created if missing). Refused, with OUT untouched, when the
    shards were embedded with different options or prototype sets, or hold different records for
    one slide; identical duplicates are stored once. Exit code 2 when refused, 3 when OUT could not
    be written (a full disk: what was merged stays; rerun the same command once there is room)."""
    from .store.merge import merge_stores

    rep = merge_stores(out, list(shards))
    for name, n in rep.per_shard.items():
        click.echo(f"{name}: {n} records")
    click.echo(rep.summary())
    click.echo(f"report: {rep.report_path}")


@store.command("salvage")
@click.argument("damaged", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The new store (must not exist yet).")
def store_salvage(damaged, out):
    """Copy every record of DAMAGED that reads and passes its checksum, byte for byte, into the new
    store OUT, and list the slide ids that could not be saved; embedding into OUT afterwards redoes
    exactly those. DAMAGED is only read (no lock file is written into it). When LMDB cannot read
    the file (a damaged meta page, B-tree or truncation) its pages are scanned instead. Exit code 0
    when every record was saved, 1 when some could not be, 2 when refused."""
    from .store.salvage import salvage_store

    rep = salvage_store(damaged, out)
    for sid, why in rep.not_saved.items():
        click.echo(f"NOT SAVED {sid}: {why}", err=True)
    if rep.outside_tree:
        click.echo(f"{len(rep.outside_tree)} record(s) were saved from pages outside the store's tree (see the "
                   "report's outside_tree: an older version cannot be ruled out for a record rewritten since)",
                   err=True)
    click.echo(rep.summary())
    if not rep.complete:
        click.echo(f"embed into {out} with the store's options to redo the slides not saved")
    click.echo(f"report: {rep.report_path}")
    sys.exit(0 if rep.complete else 1)


@store.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--sources", is_flag=True,
              help="Also compare each record's source file (size, content fingerprint) with the file now: lists "
                   "the records whose source changed or vanished.")
def store_verify(path, sources):
    """Check every record; exit 1 when any is damaged (or, with --sources, when a source file
    changed or vanished)."""
    from .store import open_store
    from .store.export import verify_store

    with open_store(path) as s:
        n = len(s)
        problems = verify_store(s)
        for sid, why in problems.items():
            click.echo(f"BAD {sid}: {why}", err=True)
        data = str(Path(path) / "data.mdb")
        if data in problems:  # the file itself is damaged: records were not all checkable
            click.echo(f"the store file is damaged ({n} records listed); records were not checked one by one; "
                       f"`proalign-engine store salvage {path} --out NEW` copies the intact ones")
            sys.exit(1)
        click.echo(f"{n - len(problems)} of {n} records OK")
        changed = _verify_sources(s, set(problems)) if sources else 0
    sys.exit(1 if problems or changed else 0)


def _verify_sources(store, damaged: set[str]) -> int:
    """Print the records whose source file changed or vanished; returns how many."""
    from .pipeline.source_check import check_source

    counts = {"changed": 0, "missing": 0, "unrecorded": 0, "legacy": 0}
    for sid in store:
        if sid in damaged:
            continue
        c = check_source(store.record(sid).meta)
        if c.status in counts:
            counts[c.status] += 1
        counts["legacy"] += c.legacy
        if c.changed:
            label = "CHANGED" if c.status == "changed" else "MISSING"
            click.echo(f"{label} {sid}: {c.path}: {c.detail}", err=True)
    bad = counts["changed"] + counts["missing"]
    line = f"sources: {counts['changed']} changed, {counts['missing']} missing"
    if counts["legacy"]:
        line += (f"; {counts['legacy']} record(s) without a content fingerprint (an older version wrote them) were "
                 "compared by size and mtime only")
    if counts["unrecorded"]:
        line += f"; {counts['unrecorded']} record(s) name no source file (not checked)"
    click.echo(line)
    return bad


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


from .eval.cli import register as _register_eval  # noqa: E402  (eval, heatmap, plot, report)

_register_eval(main)


if __name__ == "__main__":
    main()
