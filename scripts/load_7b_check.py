#!/usr/bin/env python3
"""Load a full-size checkpoint and run one forward pass; report load time, peak RSS and forward time.

    python scripts/load_7b_check.py checkpoints/llama-2-7b-hf [--dtype bf16] [--tokens 16] [--json out/load_7b_check.json]

The code is :mod:`llama_ref.checks.load_check` (its docstring says what is checked and reported).
"""

import sys

from counters.interrupt import exit_on_interrupt

if __name__ == "__main__":
    with exit_on_interrupt("load_7b_check.py") as interrupts:  # Ctrl-C from here on: one line, exit 130
        from llama_ref.checks.load_check import main

        interrupts.check()  # one that torch's import caught and went on from
        sys.exit(main())
