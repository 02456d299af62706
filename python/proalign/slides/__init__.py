"""Whole-slide image readers (slide.py), patch reading (patches.py), writers and helpers."""
