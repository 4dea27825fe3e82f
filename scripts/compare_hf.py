#!/usr/bin/env python3
"""Compare llama_ref against Hugging Face ``transformers`` on the same weights.

    python3 scripts/compare_hf.py tiny
    python3 scripts/compare_hf.py llama-2-7b --layers 2 --seqlen 64
    python3 scripts/compare_hf.py /path/to/Llama-2-7b-hf --dtype bf16 --layers 4 --json out/parity.json

The code is :mod:`llama_ref.checks.compare_hf` (its docstring says what is checked and reported).
"""

import sys

from counters.interrupt import exit_on_interrupt

if __name__ == "__main__":
    with exit_on_interrupt("compare_hf.py") as interrupts:  # Ctrl-C from here on: one line, exit 130
        from llama_ref.checks.compare_hf import main

        interrupts.check()  # one that torch's import caught and went on from
        sys.exit(main())
