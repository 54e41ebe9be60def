"""Every error featstore raises on purpose.

FeatstoreError                 base; the CLI prints its message on one line, exit 2
├── ModelError                 a model name/path/checkpoint that cannot be used
│   ├── ModelNotFoundError     not registered, not on disk, not downloadable
│   └── UnsafeCheckpointError  a checkpoint that would need code execution to load
├── ConfigError                bad options: --size, --device, precision, paths
├── ImageError                 one image cannot be decoded or is refused (per image;
│                              recorded as a failure, never stops a run)
├── StoreError                 a store that cannot be opened/written as asked
│   ├── IncompatibleStoreError append with another model/size/dtype/output mode
│   ├── StoreLockedError       another build holds the store
│   └── CorruptStoreError      arrays/attrs on disk that contradict each other
├── OutputError                an output that cannot be written (disk full, read-only)
└── UnsafeKeyError             a key that would escape the output folder
"""

from __future__ import annotations


class FeatstoreError(Exception):
    """Base of all featstore errors. The message is meant for a user, on one line."""

    exit_code = 2


class ModelError(FeatstoreError):
    pass


class ModelNotFoundError(ModelError):
    pass


class UnsafeCheckpointError(ModelError):
    pass


class ConfigError(FeatstoreError):
    pass


class ImageError(FeatstoreError):
    pass


class StoreError(FeatstoreError):
    pass


class IncompatibleStoreError(StoreError):
    pass


class StoreLockedError(StoreError):
    pass


class CorruptStoreError(StoreError):
    pass


class OutputError(FeatstoreError):
    pass


class UnsafeKeyError(FeatstoreError):
    pass
