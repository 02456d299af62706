"""The `proalign-engine` group: one clear line and an exit code for the errors we raise on purpose."""
from __future__ import annotations

import logging
import sys

import click

from .._version import __version__
from ..errors import ProAlignError, StoreWriteError


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
