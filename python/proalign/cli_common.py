"""Helpers shared by the command groups (cli.py and eval/cli.py): one definition each, so neither
command module imports the other."""
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

    from .encoders import create_encoder

    if not encoder:
        raise click.UsageError("this needs --encoder and --weights")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return create_encoder(encoder, weights, device=dev, **encoder_kwargs(encoder_args)), dev
