"""Keep freed memory in a decoding process's heap instead of handing it back to the system.

Every image makes buffers of about its decoded size (the file's bytes, the inflated
scanlines, the pixels, the resized copies), and glibc returns a freed block larger than
its thresholds to the system (`munmap`, or trimming the heap's top) at once. The next
image's buffers then fault their pages in afresh. On this project's 2-core VM a fresh
megabyte costs about 1 ms in page faults, as much as inflating a 512x512 render: the
libdeflate decode path (`featstore.fastdecode`) took 2.6 ms per render in a fresh process
with glibc's defaults against 1.6 ms with the thresholds below (benchmarks/feed.py
measures both; 3.6 against 1.5 in a loop that kept four buffers alive at once).

The main process's batches do the same (a batch of 16 224x224 images is a 9.6 MB float
tensor before the model runs, and its activations are as large). So decode workers call
`keep_freed_memory()` as they start, and `featstore.build` calls it in the calling process
(which also decodes with `--workers 0`). It raises both thresholds: blocks under 32 MiB
come from the heap, and up to 64 MiB of free heap is kept for reuse. A process's memory
then stays at its peak plus at most 64 MiB. Only glibc has these knobs; elsewhere it does
nothing.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive threshold on 64-bit systems
TRIM_THRESHOLD = 64 << 20


def keep_freed_memory() -> bool:
    """Set the process's glibc malloc thresholds (see the module docstring); whether it could."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
