"""docs/memory.md: every figure in its errata and context tables is recomputed here, from the peers' formulas
(counters.memory_peers) and from the memory algebra, and must appear in the document as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from counters.memory_peers import (accelerate_estimate, deepspeed_zero, llm_analysis_inference, llm_analysis_training,
                                   llm_viewer_prefill)
from counters.studies.memory_context import prefill_peak
from llama_ref import PRESETS
from llama_ref.memory_algebra import MemoryRequest, memory

DOC = (Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()
L2, L31 = PRESETS["llama-2-7b"], PRESETS["llama-3.1-8b"]


def _in_doc(n: int) -> None:
    assert f"{n:,}" in DOC, f"{n:,} is not in docs/memory.md"


def test_peer_figures():
    # accelerate: (6,738,415,616 params x 4 + 2 rotary buffers x 64 x 4 bytes) / 2 = 13,476,831,488
    assert accelerate_estimate(L2)["inference_fp16"].total == (6_738_415_616 * 4 + 512) // 2 == 13_476_831_488
    # DeepSpeed ZeRO-2, one GPU: 20 bytes per parameter = 134,768,312,320
    assert deepspeed_zero(L2)["zero2"].total == 20 * 6_738_415_616 == 134_768_312_320
    # llm-analysis counts Llama-2-7B with its own config: 32 x (4 x 4096^2 + 2 x 4096 x 16384 + 2 x 4096)
    # + 32000 x 4096 + 4096 = 6,573,789,184 weights, x 2 bytes = 13,147,578,368
    assert llm_analysis_inference(L2).parts["weights"] == 13_147_578_368
    for config in (L2, L31):
        a, d = accelerate_estimate(config), deepspeed_zero(config)
        for n in (a["inference_fp16"].total, a["training_fp32"].total, a["training_fp16"].total, d["zero2"].total,
                  d["zero3"].total, llm_analysis_inference(config).total, llm_analysis_training(config).total,
                  llm_viewer_prefill(config).total):
            _in_doc(n)


def test_our_figures():
    bf16 = torch.bfloat16
    for config in (L2, L31):
        common = dict(seqlen=4096, weight_dtype=bf16)
        for request in (MemoryRequest(config, device_type="meta", **common),
                        MemoryRequest(config, device_type="meta", last_only=True, **common),
                        MemoryRequest(config, device_type="cuda", attn_kernel="sdpa", last_only=True, **common),
                        MemoryRequest(config, device_type="meta", train=True, **common),
                        MemoryRequest(config, device_type="meta", train=True, recompute=True, **common),
                        MemoryRequest(config, device_type="cuda", attn_kernel="sdpa", train=True, **common)):
            _in_doc(memory(request).peak)
    _in_doc(memory(MemoryRequest(L2, seqlen=4096, weight_dtype=torch.float32, device_type="meta", train=True)).peak)


@pytest.mark.parametrize("name, column, context", [("llama-2-7b", "sdpa", 4096), ("llama-3.2-1b", "sdpa", 131072),
                                                   ("llama-3.1-70b", "math", 4096)])
def test_context_table_and_figure(name, column, context):
    row = next(line for line in DOC.splitlines() if line.startswith(f"| {name} |"))
    assert f"{prefill_peak(name, context, column) / 2**30:,.2f} GiB" in row
    png = Path(__file__).resolve().parents[1] / "docs" / "memory_vs_context.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
