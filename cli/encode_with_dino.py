#!/usr/bin/env python3
"""Reference-compatible dino encoder: a thin wrapper over featstore (see featstore/compat.py)."""

import sys

from featstore.compat import main

if __name__ == "__main__":
    sys.exit(main("dino"))
