"""Typed errors: every failure a user can cause raises a subclass of SnapshopError."""

from __future__ import annotations


class SnapshopError(Exception):
    """Base class of every error snapshop raises on purpose."""


class ImageDecodeError(SnapshopError):
    """An image could not be decoded safely.

    ``source`` names the file (or ``"<bytes>"``), ``reason`` says why in plain words.
    """

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class CatalogError(SnapshopError):
    """The catalog is missing, inconsistent or was asked for something it does not hold."""


class NotFoundError(CatalogError):
    """The catalog holds no such thing (a product or image id, a sku): the caller named
    something absent, which the service answers with 404."""


class VectorIndexError(CatalogError):
    """A vector index cannot be made, read or sized as asked (unknown kind, bad parameters,
    unreadable file, unreachable server, impossible budget). A subclass of CatalogError because
    the indexes are the catalog's caches: every caller that handles catalog failures (CLI exit
    code, the service's 400) handles these the same way; catch this to single them out."""


class FieldError(CatalogError):
    """A product field or attribute over a limit or of the wrong type: refused before anything
    is written."""


class StoredFileError(CatalogError):
    """A file the catalog stored itself (an image blob) is damaged: a server-side fault,
    never the caller's. ``path`` is the file, ``reason`` says what is wrong with it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class IngestError(SnapshopError):
    """An ingest stopped before the end of its source; the batches it committed are kept."""


class ManifestError(SnapshopError):
    """A CSV manifest or dataset listing is malformed."""


class ModelError(SnapshopError):
    """A model directory is missing, corrupt or incompatible with the catalog."""


class ConfigError(SnapshopError):
    """A parameter or configuration value is out of range."""


class CatalogUnavailableError(CatalogError):
    """The catalog database cannot be reached (server down, network, wrong password, a
    connection lost mid-transaction, which rolled it back): a server-side fault the service
    answers with 503; retrying later may succeed."""


class CatalogBusyError(CatalogError):
    """Another writer held the catalog longer than this write may wait (``write_wait_s``: an
    ingest, a reindex, a migration): the write that waited was not made (the batches an
    ingest committed before it stay); the service answers 503, and retrying later succeeds
    (skipping what is stored)."""


class CatalogStorageError(CatalogError):
    """The disk under an embedded catalog refused SQLite (full, or an I/O error) while the
    catalog database was opened: not the database's fault."""
