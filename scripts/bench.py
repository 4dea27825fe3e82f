#!/usr/bin/env python3
"""Speed of llama-ref against transformers, side by side in one run, plus counting costs.

    python3 scripts/bench.py            # full size, about 7 minutes on 2 cores -> out/bench/
    python3 scripts/bench.py --quick    # tiny shapes, seconds

The measurement is :mod:`counters.studies.bench` (see its docstring and the README's Studies section).
"""

import sys

from counters.studies.bench import main

if __name__ == "__main__":
    sys.exit(main())
