"""proalign-engine doctor: which backends, decoders and packages work here."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .._version import __version__
from .app import main


@main.command()
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the report as JSON to this file (- for standard output), as every --json does.")
def doctor(json_out):
    """Versions, live backends and devices, and why the others are not live."""
    from ..doctor import report

    r = report()
    if json_out:
        text = json.dumps(r, indent=2)
        if json_out == "-":
            click.echo(text)
            return
        Path(json_out).write_text(text + "\n")
    click.echo(f"proalign-engine {__version__}  python {r['python']}  {r['platform']}")
    for p, v in r["packages"].items():
        click.echo(f"  {p:12s} {v}")
    click.echo(f"  {'proalign._C':12s} {r['native_module']}")
    click.echo(f"devices: cuda={r['devices']['cuda']} {r['devices']['cuda_devices']}")
    for name, b in r["backends"].items():
        click.echo(f"backend {name:8s} {'live' if b['live'] else 'off: ' + b['why_not']}  methods={','.join(b['methods'])}")
