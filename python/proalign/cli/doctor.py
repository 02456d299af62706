"""proalign-engine doctor: which backends, decoders and packages work here."""
from __future__ import annotations

import json

import click

from .._version import __version__
from .app import main


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json):
    """Versions, live backends and devices, and why the others are not live."""
    from ..doctor import report

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
