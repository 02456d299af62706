"""Whole-slide image readers, writers and helpers."""
