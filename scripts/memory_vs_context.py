#!/usr/bin/env python3
"""Regenerate docs/memory_vs_context.png and print the table of docs/memory.md ("Memory against context"): the
peak of a prefill of L tokens for every Llama 2 and Llama 3 preset, from the memory algebra
(:mod:`counters.studies.memory_context`).

    python scripts/memory_vs_context.py [--out docs/memory_vs_context.png]
"""

import sys

from counters.interrupt import exit_on_interrupt

if __name__ == "__main__":
    with exit_on_interrupt("memory_vs_context.py") as interrupts:  # Ctrl-C from here on: one line, exit 130
        from counters.studies.memory_context import main

        interrupts.check()  # one that torch's import caught and went on from
        sys.exit(main())
