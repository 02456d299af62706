"""Triton kernels of proalign-engine (installed as `proalign.kernels`); one file per kernel."""
