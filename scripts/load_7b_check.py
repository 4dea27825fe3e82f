#!/usr/bin/env python3
"""Load a full-size checkpoint and run one forward pass; report load time, peak RSS and forward time.

    python scripts/load_7b_check.py checkpoints/llama-2-7b-hf [--dtype bf16] [--tokens 16] [--json out/load_7b_check.json]

The code is :mod:`llama_ref.checks.load_check` (its docstring says what is checked and reported).
"""

import sys

from llama_ref.checks.load_check import main

if __name__ == "__main__":
    sys.exit(main())
