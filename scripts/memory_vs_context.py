"""Regenerate docs/memory_vs_context.png and print the table of docs/memory.md ("Memory against context"): the
peak of a prefill of L tokens for every Llama 2 and Llama 3 preset, from the memory algebra
(:mod:`counters.studies.memory_context`).

    python scripts/memory_vs_context.py [--out docs/memory_vs_context.png]
"""

import sys

from counters.studies.memory_context import main

if __name__ == "__main__":
    sys.exit(main())
