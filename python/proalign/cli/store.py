"""proalign-engine store ...: list, show, export, merge, salvage and verify embedding stores."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from .app import main


@main.group()
def store():
    """Inspect, export and verify an embedding store."""


@store.command("ls")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def store_ls(path):
    """One line per slide: id, N, shape, method."""
    from ..store import open_store

    with open_store(path) as s:
        for sid, rec in s.items():
            click.echo(f"{sid}\tN={rec.n_patches}\tshape={tuple(rec.embedding.shape)}\t{rec.meta.get('method')}")
        click.echo(f"{len(s)} slides", err=True)


@store.command("show")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("slide_id")
def store_show(path, slide_id):
    """Provenance and a preview of one slide's embedding."""
    from ..store import open_store

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
    from ..store import open_store
    from ..store.export import export_store

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
    from ..store.merge import merge_stores

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
    from ..store.salvage import salvage_store

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
    from ..store import open_store
    from ..store.export import verify_store

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
    from ..pipeline.source_check import check_source

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
