"""Patch encoders: a registry with one factory, in the timm / open_clip style.

    from proalign.encoders import create_encoder, list_encoders
    enc = create_encoder("conch_v1", "~/models/conch_v1", device="cuda")   # local weights only
    x = enc.encode_image(enc.preprocess(patches_uint8))   # (n, 512) pre-projection features
    z = enc.project(x)                                     # (n, 512) unit-norm joint-space embeddings
    t = enc.encode_text(["tumor epithelium", "stroma"])    # (2, 512) unit-norm text embeddings

Names: the presets (presets.py: `conch_v1`, `conch_v15`, `uni_v1`, `uni_v2`, `virchow2`,
`h_optimus_0`, `h_optimus_1`, `phikon_v2`, `gigapath`), `open_clip:<arch>` (e.g. `open_clip:ViT-B-32-quickgelu` for
QuiltNet-B-32), `timm:<arch>` (e.g. `timm:vit_large_patch16_224`). The model definitions are
this package's own, reading the official checkpoints' key layouts; timm, open_clip and conch are
not needed (conch_v1 uses the conch package when it is installed and imports; the CI's parity
stage checks our definitions against all three, see the README).
"""
from __future__ import annotations

from ..errors import EncoderError
from .base import Encoder, free_memory, read_state_dict
from .registry import create_encoder, list_encoders, register_encoder

__all__ = ["Encoder", "EncoderError", "create_encoder", "free_memory", "list_encoders", "read_state_dict",
           "register_encoder"]
