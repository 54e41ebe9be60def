#!/usr/bin/env python3
"""Reference-compatible dino encoder: a thin wrapper over featstore (see featstore/compat.py)."""

import sys

try:
    from featstore.compat import main
except ModuleNotFoundError as e:
    if e.name not in ("featstore", "featstore.compat"):
        raise
    sys.exit(
        f"error: featstore is not installed for {sys.executable}: install it there (pip install -e REPOSITORY), "
        "or run the .sh wrapper with PYTHON=/path/to/bin/python of an environment that has it"
    )

if __name__ == "__main__":
    sys.exit(main("dino"))
