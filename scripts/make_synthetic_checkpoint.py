#!/usr/bin/env python3
"""Write a random-weight Llama checkpoint in the real on-disk layout of Hugging Face or Meta.

    python scripts/make_synthetic_checkpoint.py PRESET OUT --format hf|hf-bin|meta [--shards K] [--dtype bf16]

The code is :mod:`llama_ref.loading.synthetic` (its docstring says how the tensors are drawn and written).
"""

import sys

from counters.interrupt import exit_on_interrupt

if __name__ == "__main__":
    with exit_on_interrupt("make_synthetic_checkpoint.py") as interrupts:  # Ctrl-C from here on: one line, exit 130
        from llama_ref.loading.synthetic import main

        interrupts.check()  # one that torch's import caught and went on from
        sys.exit(main())
