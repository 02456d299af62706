"""Tile decoding (CPU: imagecodecs or the native libjpeg-turbo path; DALI on the CPU or a GPU). The
slide readers (proalign.slides) decode their tiles with it; patch assembly is slides/patches.py."""
