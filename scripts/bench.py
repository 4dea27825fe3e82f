#!/usr/bin/env python3
"""Speed of llama-ref against transformers, side by side in one run, plus counting costs.

    python3 scripts/bench.py            # full size, about 7 minutes on 2 cores -> out/bench/
    python3 scripts/bench.py --quick    # tiny shapes, seconds

The measurement is :mod:`counters.studies.bench` (see its docstring and the README's Studies section).
"""

import sys

from counters.interrupt import exit_on_interrupt

if __name__ == "__main__":
    with exit_on_interrupt("bench.py") as interrupts:  # Ctrl-C from here on: one line, exit 130
        from counters.studies.bench import main

        interrupts.check()  # one that torch's import caught and went on from
        sys.exit(main())
