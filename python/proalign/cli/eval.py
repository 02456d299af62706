"""Commands `eval` (+ `eval compare`), `heatmap`, `plot ...` and `report`, registered on the main
group by `register(main)`. Heavy imports happen inside the commands."""
from __future__ import annotations

from pathlib import Path

import click

from .options import encoder_options, feature_entries, with_options


eval_opts = [
    click.option("--labels", type=click.Path(dir_okay=False),
                 help="CSV: slide_id, label | time,event [, case_id | patient_id | patient]."),
    click.option("--task", type=click.Choice(["classify", "survival", "retrieve"])),
    click.option("--folds", default=5, show_default=True, type=click.IntRange(2),
                 help="Seeded patient-grouped k-fold."),
    click.option("--seed", default=0, show_default=True, type=int),
    click.option("--splits", type=click.Path(dir_okay=False), help="CSV slide_id,fold[,split] instead of k-fold."),
    click.option("--head", default=None, type=click.Choice(["logistic", "cox", "panther-linear", "linear"]),
                 help="logistic (classify default) or cox (survival default): L2 regression, its strength chosen by "
                      "inner patient-grouped CV; panther-linear: PANTHER's probe (AdamW, 50 epochs; undertrained "
                      "on small cohorts); linear: deprecated alias of panther-linear."),
    click.option("--label-col", default="label", show_default=True),
    click.option("--time-col", default="time", show_default=True),
    click.option("--event-col", default="event", show_default=True, help="1 = event; or a 'censorship' column."),
    click.option("--patient-col", default=None,
                 help="Patient column [default: the first of case_id, patient_id, patient; else the TCGA "
                      "barcode's first 12 characters, else the slide id]."),
    click.option("--neighbours", "ks", multiple=True, type=click.IntRange(1),
                 help="retrieve: neighbours (repeat). [1 3 5]"),
    click.option("--C", "C", default=None, type=float,
                 help="logistic: inverse L2 strength [default: auto, chosen per fold by inner CV over 1e-7..1e2]."),
    click.option("--alpha", default=None, type=float,
                 help="cox: L2 strength [default: auto, chosen per fold by inner CV over 1e-2..1e7]."),
    click.option("--inner-folds", default=3, show_default=True, type=click.IntRange(2),
                 help="Patient-grouped inner folds of the C/alpha search (fewer when a class has too few patients)."),
    click.option("--epochs", default=50, show_default=True, type=click.IntRange(1), help="panther-linear."),
    click.option("--lr", default=1e-4, show_default=True, type=float, help="panther-linear."),
    click.option("--weight-decay", default=1e-5, show_default=True, type=float, help="panther-linear."),
    click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="panther-linear."),
    click.option("--warmup-epochs", default=1, show_default=True, type=click.IntRange(0), help="panther-linear."),
    click.option("--standardize/--no-standardize", default=True, show_default=True,
                 help="z-score features with the training fold's statistics."),
]


# `heatmap` straight from a slide file: the encoder and patching options of `embed --archive`
slide_opts = encoder_options("Without --feature-file: conch_v1, open_clip:<arch>, timm:<name>.") + [
    click.option("--slide-mpp", type=float, default=None, help="Level-0 mpp for a slide without one."),
    click.option("--mag", type=float, default=None, help="Target magnification (default: the encoder's)."),
    click.option("--patch-size", type=click.IntRange(1), default=None, help="Patch px at --mag (default: encoder's)."),
    click.option("--min-tissue", default=None, type=click.FloatRange(0, 1),
                 help="Least tissue fraction of a patch (default 0.1)."),
    click.option("--save-features", type=click.Path(file_okay=False), default=None,
                 help="Keep the computed features as <slide>.h5 in this folder (reuse them with --feature-file)."),
]


def _head_opts(task, head, epochs, lr, weight_decay, batch_size, warmup_epochs, C, alpha, inner_folds, standardize,
               seed):
    from ..eval.heads import DEFAULT_HEAD, HEAD_ALIASES, HeadOptions

    name = HEAD_ALIASES.get(head, head) or DEFAULT_HEAD.get(task)
    if task == "classify" and name == "cox" or task == "survival" and name == "logistic":
        raise click.UsageError(f"--head {head} does not fit --task {task}")
    if C is not None and (C <= 0 or name not in ("logistic", None)):
        raise click.UsageError("--C must be > 0" if C <= 0 else f"--C sets logistic regression, not --head {name}")
    if alpha is not None and (alpha <= 0 or name not in ("cox", None)):
        raise click.UsageError("--alpha must be > 0" if alpha <= 0
                               else f"--alpha sets Cox regression, not --head {name}")
    return HeadOptions(head=head, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                       warmup_epochs=warmup_epochs, C=C, alpha=alpha, inner_folds=inner_folds,
                       standardize=standardize, seed=seed)


def _echo_fit(info):
    """The head line (with the C/alpha per fold) and any warning, after an evaluation."""
    from ..eval.evaluate import describe_head

    click.echo(describe_head(info))
    for w in info.get("warnings", []):
        click.echo(f"warning: {w}")


def _read_labels(labels, task, label_col, time_col, event_col, patient_col):
    from ..eval.data import read_labels

    lab_task = "survival" if task == "survival" else "classify"
    return read_labels(labels, lab_task, label_col=label_col, time_col=time_col, event_col=event_col,
                       patient_col=patient_col)


def register(main: click.Group) -> None:
    @main.group("eval", invoke_without_command=True)
    @click.option("--store", type=click.Path(file_okay=False), help="The embedding store to evaluate.")
    @with_options(eval_opts)
    @click.option("--row", type=int, default=None, help="Multi-tau records: evaluate this row only (default: all).")
    @click.option("--strict", is_flag=True, help="Fail when a labelled slide is missing from the store.")
    @click.option("--json", "json_out", type=click.Path(dir_okay=False),
                  help="Metrics JSON {metric: {mean, std, folds}}; predictions go to <stem>.run.json beside it.")
    @click.pass_context
    def eval_cmd(ctx, store, labels, task, folds, seed, splits, head, label_col, time_col, event_col, patient_col,
                 ks, C, alpha, inner_folds, epochs, lr, weight_decay, batch_size, warmup_epochs, standardize, row,
                 strict, json_out):
        """Evaluate frozen slide embeddings: classify, survival or retrieve (see also `eval compare`).

        Prints mean ± std over folds for each metric."""
        if ctx.invoked_subcommand is not None:
            return
        if not (store and labels and task):
            raise click.UsageError("eval needs --store, --labels and --task (or the subcommand `compare`)")
        from ..eval.data import load_dataset
        from ..eval.evaluate import evaluate
        from ..eval.splits import read_splits

        opts = _head_opts(task, head, epochs, lr, weight_decay, batch_size, warmup_epochs, C, alpha, inner_folds,
                          standardize, seed)
        lab = _read_labels(labels, task, label_col, time_col, event_col, patient_col)
        ds = load_dataset(store, lab, task, strict=strict, row=row)
        click.echo(f"{ds.summary()}; {len(ds.missing_in_store)} labelled slides not in the store, "
                   f"{ds.unlabelled_in_store} stored slides without a label")
        click.echo(ds.patients_line())
        sp = read_splits(splits, ds.slide_ids) if splits else None
        res = evaluate(ds, task, opts, folds=folds, splits=sp, ks=ks or (1, 3, 5))
        res.info.update(store=str(Path(store).resolve()), labels=str(Path(labels).resolve()))
        click.echo(f"{task}, {res.info['n_folds']} folds (seed {seed})")
        _echo_fit(res.info)
        click.echo(res.table())
        if json_out:
            m, side = res.write_json(json_out)
            click.echo(f"wrote {m} and {side}")

    @eval_cmd.command("compare")
    @click.option("--features", type=click.Path(file_okay=False), help="Folder of per-slide .h5/.pt feature files.")
    @click.option("--manifest", type=click.Path(dir_okay=False), help="CSV slide_id,path instead of a folder.")
    @click.option("--prototypes", "prototypes", required=True, type=click.Path(dir_okay=False))
    @click.option("--methods", default="proalign,panther,h2t,mean", show_default=True)
    @click.option("--out", required=True, type=click.Path(file_okay=False),
                  help="Folder: stores/<method>, eval-<method>.json, compare.json, compare.txt.")
    @with_options(eval_opts)
    @click.option("--backend", default=None, help="Aggregation backend for the embedding step.")
    def eval_compare(features, manifest, prototypes, methods, out, labels, task, folds, seed, splits, head,
                     label_col, time_col, event_col, patient_col, ks, C, alpha, inner_folds, epochs, lr, weight_decay,
                     batch_size, warmup_epochs, standardize, backend):
        """Embed the same features with several methods and evaluate them side by side (same folds)."""
        from ..aggregate import METHODS
        from ..eval.compare import compare_methods

        if not (labels and task):
            raise click.UsageError("eval compare needs --labels and --task")
        if (features is None) == (manifest is None):
            raise click.UsageError("give exactly one of --features DIR or --manifest CSV")
        meths = [m.strip() for m in methods.split(",") if m.strip()]
        bad = [m for m in meths if m not in METHODS]
        if bad or not meths:
            raise click.UsageError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        entries = feature_entries(features, manifest)
        opts = _head_opts(task, head, epochs, lr, weight_decay, batch_size, warmup_epochs, C, alpha, inner_folds,
                          standardize, seed)
        lab = _read_labels(labels, task, label_col, time_col, event_col, patient_col)
        cmp = compare_methods(entries, prototypes, lab, out, task, meths, opts, folds=folds, splits_csv=splits,
                              ks=ks or (1, 3, 5), backend=backend)
        for m, fails in cmp.failed.items():
            click.echo(f"{m}: {len(fails)} slides failed to embed (see {out}/stores/{m}/reports)", err=True)
        first = next(iter(cmp.results.values()))
        click.echo(f"{task}, {first.info['n_slides']} slides, {first.info['n_folds']} folds (seed {seed})")
        click.echo(f"patients: {first.info['patient_source']} ({first.info['n_patients']} patients for "
                   f"{first.info['n_slides']} slides)")
        for m, r in cmp.results.items():
            click.echo(f"{m}: ", nl=False)
            _echo_fit(r.info)
        click.echo(cmp.table())
        click.echo(f"wrote {Path(out) / 'compare.json'}")

    @main.command("heatmap")
    @click.argument("slide", required=False, type=click.Path(exists=True, dir_okay=False))
    @click.option("--feature-file", "features", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="The slide's features .h5 (features + coords). Without it: computed from SLIDE "
                       "with --encoder/--weights.")
    @click.option("--prototypes", "prototypes", required=True, type=click.Path(exists=True, dir_okay=False))
    @click.option("--descriptions", default=None, help="Description set (shipped name or JSON) for the type names.")
    @click.option("--tau", default=0.1, show_default=True, type=float)
    @click.option("--scale", default="linear", show_default=True, type=click.Choice(["linear", "rank"]),
                  help="linear: a / max a per prototype; rank: percentile among the slide's patches.")
    @click.option("--thumbnail-size", default=1024, show_default=True, type=click.IntRange(64))
    @with_options(slide_opts)
    @click.option("--montage", "montage_out", default=None, type=click.Path(dir_okay=False),
                  help="Also write each prototype's top-attention patches of SLIDE to this PNG.")
    @click.option("--montage-n", default=8, show_default=True, type=click.IntRange(1),
                  help="--montage: patches per prototype.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file.")
    def heatmap(slide, features, prototypes, descriptions, tau, scale, thumbnail_size, encoder, weights,
                encoder_args, device, slide_mpp, mag, patch_size, min_tissue, save_features, montage_out, montage_n,
                out):
        """Per-prototype attention a_ik over SLIDE's thumbnail (no SLIDE: over a blank canvas).

        The patch features come from --feature-file, or are computed from SLIDE itself with
        --encoder E --weights W (tissue -> patch grid -> encoder, as `embed --archive` does)."""
        from ..eval.plots import slide_pictures

        if montage_out and not slide:
            raise click.UsageError("--montage reads the top patches from SLIDE: give the slide file")
        if features is None:
            if not encoder:
                raise click.UsageError("give the slide's --feature-file FILE, or --encoder E --weights W to compute "
                                       "them from SLIDE")
            if not slide:
                raise click.UsageError("--encoder computes features from SLIDE: give the slide file")
            if not weights:
                raise click.UsageError("--encoder needs --weights (a local weights file or folder)")
            from .options import load_encoder
            from ..pipeline.embed_slides import SlideOptions

            enc, dev = load_encoder(encoder, weights, encoder_args, device)
            kw = dict(encoder=enc, device=dev, mpp=slide_mpp, save_features=save_features,
                      slide_options=SlideOptions(magnification=mag, patch_size=patch_size,
                                                 min_tissue=0.1 if min_tissue is None else min_tissue))
        else:
            extra = [name for name, v in (("--encoder", encoder), ("--weights", weights),
                                          ("--encoder-arg", encoder_args), ("--device", device),
                                          ("--slide-mpp", slide_mpp), ("--mag", mag), ("--patch-size", patch_size),
                                          ("--min-tissue", min_tissue), ("--save-features", save_features))
                     if v not in (None, ())]
            if extra:
                raise click.UsageError(f"{', '.join(extra)} compute features from SLIDE: not with --feature-file")
            kw = dict(features_path=features)
        try:
            res = slide_pictures(slide, prototypes, out, descriptions=descriptions, tau=tau, scale=scale,
                                 thumbnail_size=thumbnail_size, montage_out=montage_out, montage_n=montage_n, **kw)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
        if features is None:
            click.echo(f"{res.slide_id}: {len(res.features)} patches encoded with {encoder}"
                       + (f", features kept in {res.features_path}" if res.features_path else ""))
        click.echo(f"wrote {res.heatmap}")
        if res.montage:
            click.echo(f"wrote {res.montage}")

    @main.group("plot")
    def plot():
        """Pictures as PNG: montage, usage, map, roc, km."""

    @plot.command("montage")
    @click.argument("slide", type=click.Path(exists=True, dir_okay=False))
    @click.option("--feature-file", "features", required=True, type=click.Path(exists=True, dir_okay=False),
                  help="The slide's features .h5 (features + coords).")
    @click.option("--prototypes", "prototypes", required=True, type=click.Path(exists=True, dir_okay=False))
    @click.option("--descriptions", default=None)
    @click.option("--n", default=8, show_default=True, type=click.IntRange(1), help="Patches per prototype.")
    @click.option("--tau", default=0.1, show_default=True, type=float)
    @click.option("--patch-px", default=96, show_default=True, type=click.IntRange(16))
    @click.option("--out", required=True, type=click.Path(dir_okay=False))
    def plot_montage(slide, features, prototypes, descriptions, n, tau, patch_px, out):
        """Each prototype's top-attention patches of SLIDE."""
        from ..eval.plots import slide_montage

        try:
            p = slide_montage(slide, features, prototypes, out, n, descriptions, tau, patch_px)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"wrote {p}")

    @plot.command("usage")
    @click.option("--store", required=True, type=click.Path(exists=True, file_okay=False))
    @click.option("--descriptions", default=None)
    @click.option("--row", default=0, show_default=True, type=int, help="tau row of multi-tau records.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False))
    def plot_usage(store, descriptions, row, out):
        """Prototype usage across the cohort, from the stored proportions pi."""
        from ..eval.plots import prototype_names, prototype_usage, usage_from_store
        from ..eval.report import _proto_meta

        try:
            pi, meta = usage_from_store(store, row)
        except ValueError as e:
            raise click.ClickException(str(e)) from e
        p = prototype_usage(pi, out, prototype_names(pi.shape[1], _proto_meta(meta), descriptions))
        click.echo(f"wrote {p}")

    @plot.command("map")
    @click.option("--store", required=True, type=click.Path(exists=True, file_okay=False))
    @click.option("--labels", required=True, type=click.Path(exists=True, dir_okay=False))
    @click.option("--label-col", default="label", show_default=True)
    @click.option("--projection", default="pca", show_default=True, type=click.Choice(["pca", "tsne"]))
    @click.option("--out", required=True, type=click.Path(dir_okay=False))
    def plot_map(store, labels, label_col, projection, out):
        """Slide embeddings in 2-D, coloured by label."""
        from ..eval.data import load_dataset, read_labels
        from ..eval.plots import embedding_map

        ds = load_dataset(store, read_labels(labels, "classify", label_col=label_col), "classify")
        try:
            p = embedding_map(ds.x, [ds.classes[i] for i in ds.y], out, method=projection)
        except ValueError as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"wrote {p}")

    @plot.command("roc")
    @click.option("--eval-json", required=True, type=click.Path(exists=True, dir_okay=False))
    @click.option("--out", required=True, type=click.Path(dir_okay=False))
    def plot_roc(eval_json, out):
        """ROC curves from a classification `eval --json` output."""
        from ..eval.plots import roc_figure

        _figure_from_run(roc_figure, eval_json, out)

    @plot.command("km")
    @click.option("--eval-json", required=True, type=click.Path(exists=True, dir_okay=False))
    @click.option("--out", required=True, type=click.Path(dir_okay=False))
    def plot_km(eval_json, out):
        """Kaplan-Meier curves of predicted risk halves from a survival `eval --json` output."""
        from ..eval.plots import km_figure

        _figure_from_run(km_figure, eval_json, out)

    @main.command("report")
    @click.option("--store", required=True, type=click.Path(exists=True, file_okay=False))
    @click.option("--eval-json", "eval_jsons", multiple=True, type=click.Path(exists=True, dir_okay=False),
                  help="`eval --json` or `eval compare`'s compare.json (repeat).")
    @click.option("--labels", type=click.Path(exists=True, dir_okay=False), help="Colours the embedding map.")
    @click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
                  help="More PNGs to include (e.g. heatmaps).")
    @click.option("--descriptions", default=None, help="Type names for the usage chart.")
    @click.option("--title", default=None)
    @click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .html file.")
    def report(store, eval_jsons, labels, images, descriptions, title, out):
        """One self-contained HTML page: store summary, provenance, evaluation tables, pictures."""
        from ..eval.report import build_report

        try:
            p = build_report(store, out, eval_jsons, labels, images, title, descriptions)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"wrote {p} ({p.stat().st_size // 1024} KiB)")


def _figure_from_run(figure, eval_json, out) -> None:
    """Draw `figure(run, out)` from an `eval --json` output; a run it cannot draw is a command error."""
    from ..eval.plots import load_run

    try:
        click.echo(f"wrote {figure(load_run(eval_json), out)}")
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
