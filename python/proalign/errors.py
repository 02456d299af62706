"""Errors that name the file or slide and the problem, so a run report can be read by a person."""
from __future__ import annotations


class ProAlignError(Exception):
    """Base class of every error this package raises on purpose."""


class FeatureFileError(ProAlignError):
    """A per-slide feature file is missing, unreadable or malformed."""

    def __init__(self, path: str, problem: str, slide_id: str | None = None):
        self.path, self.problem, self.slide_id = str(path), problem, slide_id
        who = f"slide {slide_id!r} ({path})" if slide_id else str(path)
        super().__init__(f"{who}: {problem}")


class PrototypeError(ProAlignError):
    """A prototype file or prototype set is unusable (missing, wrong shape, collapsed)."""


class StoreError(ProAlignError):
    """The embedding store cannot be opened, read or written."""


class StoreLockedError(StoreError):
    """Another process holds the store's writer lock."""


class StoreOptionsError(StoreError):
    """A run would add records made with other options (method variant, tau, prototypes, ...) to a
    store: one store holds one option set, so a comparison never mixes variants unknowingly."""


class SourceChangedError(StoreError):
    """Stored records whose source files changed since they were embedded, in a run told to stop
    on that (`--on-change fail`); nothing was written."""


class StoreWriteError(StoreError):
    """One record could not be written (disk full, file size limit); earlier records are intact."""


class SlideError(ProAlignError):
    """A slide file cannot be opened or read (format, metadata, a corrupt tile)."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class EncoderError(ProAlignError):
    """A patch encoder cannot be built or used: unknown name, missing or mismatched weights (the
    message says what to download and where to put it), missing tokenizer, no text tower."""
