#!/usr/bin/env python3
"""Real weights: llama-ref against transformers on one checkpoint, in fresh processes, alternately.

    python3 scripts/bench_weights.py checkpoints/llama-2-7b-hf    # -> out/bench-weights/
    python3 scripts/bench_weights.py CKPT --device cuda          # on a GPU: + prefill MFU, decode HBM fraction

The measurement is :mod:`counters.studies.bench_weights` (see its docstring and docs/benchmarks.md).
"""

import sys

from counters.interrupt import exit_on_interrupt

if __name__ == "__main__":
    with exit_on_interrupt("bench_weights.py") as interrupts:  # Ctrl-C from here on: one line, exit 130
        from counters.studies.bench_weights import main

        interrupts.check()  # one that torch's import caught and went on from
        sys.exit(main())
