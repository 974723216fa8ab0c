"""Typed errors. Every message names the bad value and the fix.

Tests assert the type, never the text. ``SterlingError`` is the root so that
the CLI and the gRPC layer can map any of them to a clean failure.
"""

from __future__ import annotations

__all__ = [
    "SterlingError",
    "InvalidInputError",
    "DimensionMismatchError",
    "NonFiniteError",
    "DuplicateIdError",
    "EmptyCatalogError",
    "CatalogFormatError",
    "MissingColumnError",
    "LimitExceededError",
    "TooManyAttributesError",
    "InvalidAttributeError",
    "FilterError",
    "FilterSyntaxError",
    "FilterTooLargeError",
    "ArtifactError",
    "CorruptArtifactError",
    "ForeignArtifactError",
    "UnsupportedVersionError",
    "SnapshotError",
    "CorruptLogError",
    "VersionTimeoutError",
    "ItemFeaturesError",
]


class SterlingError(Exception):
    """Root of every error Sterling raises on purpose."""


class InvalidInputError(SterlingError, ValueError):
    """A caller-supplied value is out of range or malformed."""


class DimensionMismatchError(InvalidInputError):
    """Vectors whose last dimension differs from the index's."""


class NonFiniteError(InvalidInputError):
    """NaN or inf in embeddings or queries."""


class DuplicateIdError(InvalidInputError):
    """The same external id given to two items (or a negative id)."""


class EmptyCatalogError(InvalidInputError):
    """A build was asked for with zero items."""


class InvalidAttributeError(InvalidInputError):
    """An item attribute that is not of the form ``feature:value``."""


class CatalogFormatError(InvalidInputError):
    """A catalog or vector file that is not what it claims (empty, not Parquet/NumPy, wrong column type)."""


class MissingColumnError(CatalogFormatError):
    """A required catalog column (``id``, ``embedding``) is absent; the message lists the columns found."""


class LimitExceededError(InvalidInputError):
    """A value above a configured limit; ``name``, ``value`` and ``limit`` say which and by how much."""

    def __init__(self, message: str, *, name: str, value: int, limit: int) -> None:
        super().__init__(message)
        self.name = name
        self.value = value
        self.limit = limit


class TooManyAttributesError(LimitExceededError, InvalidAttributeError):
    """One item carries more attributes than ``IndexConfig.max_attributes_per_item``."""


class FilterError(InvalidInputError):
    """A filter expression that cannot be evaluated."""


class FilterSyntaxError(FilterError):
    """A malformed filter expression; ``position`` is the 0-based character offset."""

    def __init__(self, message: str, *, expression: str, position: int) -> None:
        pointer = " " * position + "^"
        super().__init__(
            f"{message} at position {position} in filter expression:\n  {expression}\n  {pointer}\n"
            "Filters are terms `feature:value` joined by AND, OR, NOT and parentheses, "
            'e.g. "lang:en AND (country:US OR country:CA) AND NOT policy:blocked".'
        )
        self.expression = expression
        self.position = position


class FilterTooLargeError(FilterError):
    """More terms in one expression than the configured limit."""


class ArtifactError(SterlingError):
    """A model artifact that cannot be written or read."""


class CorruptArtifactError(ArtifactError):
    """Checksum or size mismatch: the file was damaged after it was written."""


class ForeignArtifactError(ArtifactError):
    """The file is not a Sterling artifact at all."""


class UnsupportedVersionError(ArtifactError):
    """An artifact written by a newer, incompatible format version."""


class SnapshotError(ArtifactError):
    """A snapshot that could not be written (disk full, I/O error); the log still holds its batches."""


class CorruptLogError(SterlingError):
    """An update log that cannot be replayed onto its snapshot (records missing)."""


class VersionTimeoutError(SterlingError):
    """A read asked for a version (``min_version``) not reached before its deadline."""


class ItemFeaturesError(InvalidInputError):
    """An upsert that gives a vector where the model embeds item features itself, or the reverse.

    A learned model's index entry and OverArch cache row both come from its
    item tower, so its upserts carry item features (items-table columns), not
    embeddings; an index model has no item tower and takes embeddings.
    """
