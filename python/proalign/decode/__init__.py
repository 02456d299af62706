"""Tile decoding (CPU: imagecodecs or DALI; GPU: DALI/nvImageCodec) and patch assembly."""
