"""Per-slide patch feature files (TRIDENT/CLAM `.h5`, `.pt`) and the cohort listing over them."""
from .io import FEATURE_SUFFIXES, FeatureFile, SlideEntry, list_slides, read_features, read_rows

__all__ = ["FEATURE_SUFFIXES", "FeatureFile", "SlideEntry", "list_slides", "read_features", "read_rows"]
