#!/usr/bin/env python3
"""Run a tensor-parallel forward of a checkpoint on every rank and check it against one process.

    torchrun --standalone --nproc-per-node N scripts/tp_check.py CHECKPOINT [--tokens-file PT]
             [--save-logits PT] [--json OUT] [--device auto|cpu|cuda] [--dtype bf16|fp16|fp32]
             [--kernel math|sdpa] [--tol 1e-4] [--no-reference] [--no-hf]

The code is :mod:`llama_ref.checks.tp_check` (its docstring says what is checked and reported).
"""

import sys

from counters.interrupt import exit_on_interrupt

if __name__ == "__main__":
    with exit_on_interrupt("tp_check.py") as interrupts:  # Ctrl-C from here on: one line, exit 130
        from llama_ref.checks.tp_check import main

        interrupts.check()  # one that torch's import caught and went on from
        sys.exit(main())
