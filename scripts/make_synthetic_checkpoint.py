#!/usr/bin/env python3
"""Write a random-weight Llama checkpoint in the real on-disk layout of Hugging Face or Meta.

    python scripts/make_synthetic_checkpoint.py PRESET OUT --format hf|hf-bin|meta [--shards K] [--dtype bf16]

The code is :mod:`llama_ref.loading.synthetic` (its docstring says how the tensors are drawn and written).
"""

import sys

from llama_ref.loading.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
