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
├── StorageTimeoutError        object storage that does not answer within the timeouts
├── DecodeWorkersError         decode workers killed again and again, no image to blame
├── UnsafeKeyError             a key that would escape the output folder
└── BuildInterrupted           a build stopped by SIGINT/SIGTERM/SIGHUP after committing
                               what it had encoded; exit 128 + the signal number
"""

from __future__ import annotations

from typing import Any


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


class StorageTimeoutError(FeatstoreError):
    pass


class DecodeWorkersError(FeatstoreError):
    pass


class UnsafeKeyError(FeatstoreError):
    pass


class BuildInterrupted(FeatstoreError):
    """Raised by `build` after a stop signal, once the encoded images are committed."""

    def __init__(self, signum: int, kept: int, result: Any = None) -> None:
        super().__init__(f"interrupted: {kept} images kept, re-run the same command to resume")
        self.signum = signum
        self.kept = kept
        self.result = result  # the BuildResult of what was done, when the run had started
        self.exit_code = 128 + signum
