"""Per-slide patch feature files (TRIDENT/CLAM `.h5`, `.pt`) and the cohort listing over them."""
from .io import FEATURE_SUFFIXES, FeatureFile, FeatureFileEntry, list_feature_files, read_features, read_rows

__all__ = ["FEATURE_SUFFIXES", "FeatureFile", "FeatureFileEntry", "list_feature_files", "read_features", "read_rows"]
