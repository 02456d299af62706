"""proalign-engine describe, prototypes build and prototypes train (METHOD.md Steps 1-4)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .._version import __version__
from .app import main
from .options import archive_opts, encoder_opts, features_opts, load_encoder, prototype_pool, with_options


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

    from ..prototypes.descriptions import description_set_hash, dumps, save_descriptions
    from ..prototypes.descriptions.llm import DescribeError, DescribeSettings, generate_description_set

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
@with_options(features_opts + archive_opts + encoder_opts)
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
    from ..prototypes.build import prototypes_from_pool
    from ..prototypes.io import read_prototype_file, save_prototypes
    from ..prototypes.text import teacher

    enc = dev = None
    if encoder or archive:
        enc, dev = load_encoder(encoder, weights, encoder_args, device)
    pool = prototype_pool(archive, features, manifest, enc, dev, pool_size, seed, mag, patch_size, min_tissue,
                          slide_mpp, mpp_csv)
    meta_extra: dict = {}
    text_init: dict = {}  # what only init=text uses
    if init == "text":  # descriptions -> text prototypes, W, tau_a: the one recipe (prototypes.text.teacher)
        try:
            t = teacher(enc, descriptions, text_prototypes, projection, tau_a)
        except ValueError as e:
            raise click.UsageError(f"init=text: {e}") from e
        text_init = dict(text_prototypes=t.text, projection=t.projection, tau_a=t.tau_a)
        meta_extra = dict(t.meta)
        k = t.text.shape[0]
    if enc is not None:
        meta_extra["encoder"] = enc.name
    initial = read_prototype_file(from_file)[0] if from_file else None
    ps = prototypes_from_pool(pool, init=init, k=k, seed=seed, top_fraction=top_fraction, initial=initial,
                              **text_init)
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
@with_options(features_opts + archive_opts + encoder_opts)
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
    from ..prototypes.io import read_prototype_file
    from ..prototypes.text import teacher
    from ..prototypes.train import CollapsedSetError, save_trained, train_prototypes

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
    pool = prototype_pool(archive, features, manifest, enc, dev, pool_size, seed, mag, patch_size, min_tissue,
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
