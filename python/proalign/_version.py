"""The package version (a leaf: every module that needs it imports it from here, not the facade)."""
__version__ = "0.1.0"
