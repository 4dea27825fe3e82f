#!/usr/bin/env python3
"""Validate llama-ref on a CUDA GPU: exact counts, per-layer speed, and logits against transformers.

    python3 scripts/validate_gpu.py                                 # llama-2-7b, synthetic bf16 weights
    python3 scripts/validate_gpu.py --checkpoint /path/to/Llama-2-7b-hf
    python3 scripts/validate_gpu.py --device cpu --model tiny --dtype fp32   # the same steps on CPU

Exit status: 0 all checks passed, 1 a check failed, 2 cannot run (e.g. no CUDA device). The validation is
:mod:`counters.studies.validate` (see its docstring and the README's Studies section).
"""

import sys

from counters.studies.validate import main

if __name__ == "__main__":
    sys.exit(main())
