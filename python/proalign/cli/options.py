"""What several commands share: option lists, their parsing, the encoder loader, the mpp rule and
the prototype pool. One definition each; commands import from here."""
from __future__ import annotations

import json

import click


def encoder_kwargs(encoder_args) -> dict:
    """--encoder-arg KEY=VALUE items -> keyword arguments for create_encoder (VALUE parsed as JSON
    when it is JSON, else kept as the string)."""
    kwargs = {}
    for item in encoder_args:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"--encoder-arg wants KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def load_encoder(encoder, weights, encoder_args, device):
    """(encoder, device) from the --encoder/--weights/--encoder-arg/--device options; the device
    defaults to cuda when torch sees a GPU."""
    import torch

    from ..encoders import create_encoder

    if not encoder:
        raise click.UsageError("this needs --encoder and --weights")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return create_encoder(encoder, weights, device=dev, **encoder_kwargs(encoder_args)), dev


def feature_entries(features, manifest):
    from ..features import list_feature_files

    if (features is None) == (manifest is None):
        raise click.UsageError("give exactly one of --features DIR or --manifest CSV")
    try:
        entries = list_feature_files(features=features, manifest=manifest)
    except (OSError, ValueError) as e:
        raise click.UsageError(str(e)) from e
    if not entries:
        raise click.UsageError(f"no .h5 or .pt feature files found in {features or manifest}")
    return entries


features_opts = [
    click.option("--features", type=click.Path(file_okay=False), help="Folder of per-slide .h5/.pt feature files."),
    click.option("--manifest", type=click.Path(dir_okay=False), help="CSV with columns slide_id,path instead of a folder."),
]


def encoder_options(encoder_help: str = "conch_v1, open_clip:<arch>, timm:<name> (see README).") -> list:
    """--encoder (with a command's own help), --weights, --encoder-arg, --device."""
    return [click.option("--encoder", default=None, help=encoder_help)] + _weights_opts


_weights_opts = [
    click.option("--weights", type=click.Path(exists=True), default=None, help="Local weights file or folder."),
    click.option("--encoder-arg", "encoder_args", multiple=True, metavar="KEY=VALUE",
                 help="Extra create_encoder argument (e.g. tokenizer=PATH); repeatable."),
    click.option("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when present)."),
]
encoder_opts = encoder_options()
def _keep_mpp_keys(ctx, param, value):
    # not a parameter of the commands: mpp_options reads it from the context (one rule for all of them)
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


def apply_grid_preset(preset: str | None, edge: str, min_tissue: float) -> tuple[str, float]:
    """--grid-preset trident: TRIDENT's grid rule (edge pad: every patch whose top-left corner is in
    the slide; min tissue 0), for --edge/--min-tissue not given on the command line."""
    if preset is None:
        return edge, min_tissue
    from click.core import ParameterSource

    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)

    return (edge if given("edge") else "pad"), (min_tissue if given("min_tissue") else 0.0)


def gpus_option(text: str | None, scheduler: str, device: str | None = None) -> list[int] | None:
    """--gpus 0,1,3 -> [0, 1, 3], checked against the GPUs this machine has."""
    if text is None:
        return None
    if scheduler != "local":
        raise click.UsageError("--gpus is for the local scheduler; with Ray use --ray-gpus")
    if device is not None and device != "cuda":
        raise click.UsageError(f"--gpus gives each worker its own GPU as cuda; it cannot go with --device {device}")
    from ..pipeline.scheduler import parse_gpus

    try:
        if not any(t.strip() for t in text.split(",")):
            raise ValueError(f"--gpus wants comma-separated GPU numbers, got {text!r}")
        import torch

        return parse_gpus(text, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def prototype_pool(archive, features, manifest, enc, dev, pool_size, seed, mag, patch_size, min_tissue, slide_mpp,
                   mpp_csv):
    """The prototype pool: patches of slide files encoded on the fly (--archive), or rows of feature files."""
    from ..prototypes.build import sample_pool

    if not archive:
        return sample_pool(feature_entries(features, manifest), pool_size, seed)
    from ..prototypes.from_slides import sample_slide_pool
    from ..slides.patching import list_slide_files

    paths = list_slide_files(archive)
    if not paths:
        raise click.UsageError(f"no slide files found under {archive}")
    rule = mpp_options(slide_mpp, mpp_csv)
    pool = sample_slide_pool(paths, enc, pool_size, seed, magnification=mag, patch_size=patch_size,
                             min_tissue=min_tissue, mpp_for=rule.user_mpp, device=dev, mpp_keys=rule.keys)
    say_missing_mpp(pool.skipped)
    return pool


def mpp_options(slide_mpp, mpp_csv):
    """The mpp options of every command (--mpp-csv, --slide-mpp, --custom-mpp-keys) as one
    slides.mpp.MppRule: the user's mpp per slide (`user_mpp`) and the custom keys (`keys`)."""
    from ..slides.mpp import mpp_rule

    ctx = click.get_current_context(silent=True)
    keys = ctx.meta.get("custom_mpp_keys") if ctx is not None else None
    return mpp_rule(mpp_csv=mpp_csv, slide_mpp=slide_mpp, custom_mpp_keys=keys)


def say_missing_mpp(failed: dict) -> dict:
    """{slide id: reason} of a run -> the same with the missing-mpp fix left out of each reason,
    after saying, once, which slides have no mpp and how to give it."""
    from ..slides.mpp import is_missing_mpp, missing_mpp_summary, without_fix

    missing = [sid for sid, why in failed.items() if is_missing_mpp(why)]
    if missing:
        click.echo(missing_mpp_summary(missing), err=True)
    return {sid: without_fix(why) if sid in missing else why for sid, why in failed.items()}


def with_options(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco
