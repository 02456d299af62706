"""Prototype sets: files (load/save/hash) and building them from a cohort's features."""
from .io import load_prototypes, prototype_hash, read_prototype_file, save_prototypes

__all__ = ["load_prototypes", "prototype_hash", "read_prototype_file", "save_prototypes"]
