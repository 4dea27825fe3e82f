#!/usr/bin/env python3
"""Validate llama-ref on a CUDA GPU: exact counts, per-layer speed, and logits against transformers.

    python3 scripts/validate_gpu.py                                 # llama-2-7b, synthetic bf16 weights
    python3 scripts/validate_gpu.py --checkpoint /path/to/Llama-2-7b-hf
    python3 scripts/validate_gpu.py --device cpu --model tiny --dtype fp32   # the same steps on CPU

Exit status: 0 all checks passed, 1 a check failed, 2 cannot run (e.g. no CUDA device). The validation is
:mod:`counters.studies.validate` (see its docstring and the README's Studies section).
"""

import sys

from counters.interrupt import exit_on_interrupt

if __name__ == "__main__":
    with exit_on_interrupt("validate_gpu.py") as interrupts:  # Ctrl-C from here on: one line, exit 130
        from counters.studies.validate import main

        interrupts.check()  # one that torch's import caught and went on from
        sys.exit(main())
