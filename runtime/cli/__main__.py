"""`python -m pmnc.runtime.cli`: the `pmnc-runtime` command without its console script."""

import sys

from . import main

sys.exit(main())
