#!/usr/bin/env python3
"""Compare llama_ref against Hugging Face ``transformers`` on the same weights.

    python3 scripts/compare_hf.py tiny
    python3 scripts/compare_hf.py llama-2-7b --layers 2 --seqlen 64
    python3 scripts/compare_hf.py /path/to/Llama-2-7b-hf --dtype bf16 --layers 4 --json out/parity.json

The code is :mod:`llama_ref.checks.compare_hf` (its docstring says what is checked and reported).
"""

import sys

from llama_ref.checks.compare_hf import main

if __name__ == "__main__":
    sys.exit(main())
