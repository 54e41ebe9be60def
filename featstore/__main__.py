"""`python -m featstore`: the `featstore` command."""

import os
import sys

if getattr(sys.modules.get("featstore"), "__file__", None) is None:
    # Run from the folder that contains a clone named `featstore`, Python took that folder
    # for a namespace package `featstore` (an editable install is found only after it),
    # and `featstore.cli` would be the clone's `cli/` folder. This file is the installed
    # package's: import that package instead.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in [m for m in sys.modules if m == "featstore" or m.startswith("featstore.")]:
        del sys.modules[name]

from featstore.cli import main

main()
