"""The forward is a pure tensor program: torch.compile takes it whole (no graph break, no recompile per step),
and what the eager guards check is skipped inside compiled code, not lost."""

from __future__ import annotations

import pytest
import torch

from llama_ref import Llama, LlamaConfig, check_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = LlamaConfig.from_preset("tiny")


def _model(**kwargs) -> Llama:
    torch.manual_seed(0)
    model = Llama(TINY, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _tokens(bsz: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (bsz, seqlen), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_no_graph_break_in_prefill_or_decode(attn_kernel):
    model = _model(attn_kernel=attn_kernel)
    tokens = _tokens(2, 9)
    with torch.no_grad():
        prefill = torch._dynamo.explain(model)(tokens[:, :8])
        model.setup_cache(2, 16)
        model(tokens[:, :8])
        decode = torch._dynamo.explain(model)(tokens[:, 8:], 8)
        static = torch._dynamo.explain(model)(tokens[:, 8:], torch.tensor(8))
    for explained in (prefill, decode, static):
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_compiled_calls_skip_the_guards_and_eager_calls_keep_them():
    """Inside compiled code the guards are skipped (torch.compiler.is_compiling), so their refusals are the
    caller's: check_inputs once per request. Eager calls still refuse reading unwritten KV slots."""
    model = _model()
    model.setup_cache(1, 16)
    with torch.no_grad():
        model(_tokens(1, 4))
        with pytest.raises(ValueError, match="start_pos=10 is beyond the filled part"):
            model(_tokens(1, 1), 10)
        with pytest.raises(ValueError, match="start_pos=10 is beyond the filled part"):
            check_inputs(model, _tokens(1, 1), 10)
        with pytest.raises(ValueError, match="token id 300"):
            check_inputs(model, torch.tensor([[300]]), 4)
    assert model.cache_filled() == 4


@pytest.mark.slow
def test_fullgraph_compiled_decode_loop_equals_eager_and_compiles_once():
    """The one torch.compile test in CI (inductor on the CPU; about 20-40 s on 2 cores). 16 decode steps with
    the position as a tensor (static shapes, as gpt-fast) compile one graph and equal eager within 1e-5; then
    generate(compile=True), same shapes, reuses that compilation and returns eager's tokens."""
    from torch._dynamo.utils import counters

    from llama_ref import generate

    model = _model()
    tokens = _tokens(2, 21)
    with torch.inference_mode():  # as generate runs (a grad mode of its own would be another compilation)
        model.setup_cache(2, 32)  # generate's cache bucket for 4 + 16 positions
        model(tokens[:, :4])  # prefill
        eager = [model(tokens[:, pos : pos + 1], pos, last_only=True) for pos in range(4, 20)]
        model.reset_cache()
        model(tokens[:, :4])  # eager prefill
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(model, fullgraph=True, dynamic=False)
        compiled = [step(tokens[:, pos : pos + 1].contiguous(), torch.tensor(pos), last_only=True)
                    for pos in range(4, 20)]
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, not once per step
    for want, got in zip(eager, compiled):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    prompts = tokens[:, :4].tolist()
    assert generate(model, prompts, 16, compile=True) == generate(model, prompts, 16)
    assert counters["stats"]["unique_graphs"] == 1  # the same shapes: no new compilation
