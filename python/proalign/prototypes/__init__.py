"""Prototype sets: files (load/save/hash), description sets and text prototypes, and building them
from a cohort's features."""
from .descriptions import (DescriptionSet, description_set_hash, list_description_sets, load_descriptions,
                           validate)
from .io import load_prototypes, prototype_hash, read_prototype_file, save_prototypes
from .text import text_prototypes

__all__ = ["DescriptionSet", "description_set_hash", "list_description_sets", "load_descriptions", "load_prototypes",
           "prototype_hash", "read_prototype_file", "save_prototypes", "text_prototypes", "validate"]
