"""A whole inference task: prefill + decode steps, counted by running the real generation loop."""

from __future__ import annotations

import json

import pytest
import torch

from counters.cli import EXIT_BAD_INPUT, EXIT_OK, main
from counters.crosscheck import crosscheck_generation
from counters.generation import Generation, generation_forwards, generation_macs
from counters.result import DECODE, PREFILL
from llama_ref import Llama, LlamaConfig, PRESETS

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = LlamaConfig(name="small", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                    max_seq_len=64)


def test_the_forwards_of_a_generation():
    # 4 new tokens after a 5-token prompt: the prefill predicts the first, 3 one-token steps the others
    assert generation_forwards(Generation(5, 4)) == [(0, 5), (5, 1), (6, 1), (7, 1)]
    assert generation_forwards(Generation(5, 1)) == [(0, 5)]


def test_closed_form_by_hand():
    a, b = 6_607_077_376, 262_144  # Llama-2-7B: MACs of an N-token forward = a N + b N^2
    got = generation_macs(PRESETS["llama-2-7b"], Generation(512, 128))
    # the output head (4096 x 32000 = 131,072,000 MACs a token) runs on the last prompt position only
    assert got[PREFILL] == a * 512 + b * 512 ** 2 - 511 * 131_072_000
    # 127 steps attending to 513 ... 639 positions: 127 a + b (127 * 512 + 128 * 127 / 2)
    assert got[DECODE] == 127 * a + b * (127 * 512 + 8128)
    scoring = generation_macs(PRESETS["llama-2-7b"], Generation(512, 128, all_logits=True))
    assert scoring[PREFILL] == a * 512 + b * 512 ** 2 and scoring[DECODE] == got[DECODE]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("attn_kernel", ["math", "sdpa"])
def test_the_real_loop_agrees_with_the_closed_form(device, attn_kernel):
    model = Llama(SMALL, device=device, attn_kernel=attn_kernel, schedule="0,1x2,2")
    g = Generation(5, 7)
    report = crosscheck_generation(model, batch=2, generation=g)
    assert report.agree and report.complete, [str(m) for m in report.mismatches[:5]]
    assert report.phases == (PREFILL, DECODE)
    closed = generation_macs(SMALL, g, batch=2, schedule="0,1x2,2")
    for name in ("analytic", "hooks", "torch"):
        assert report.totals[name][f"{PREFILL}_macs"] == closed[PREFILL]
        assert report.totals[name][f"{DECODE}_macs"] == closed[DECODE]
        assert report.totals[name]["macs"] == closed[PREFILL] + closed[DECODE]
    # the row sums equal the sum of one analyze() per step (what "closed form per row" claims)
    from counters.analytic import analyze

    steps = [analyze(SMALL, batch=2, seqlen=n, start_pos=s, schedule="0,1x2,2", last_only=True)
             for s, n in generation_forwards(g)]
    assert steps[0].macs == report.totals["analytic"][f"{PREFILL}_macs"]
    assert sum(x.macs for x in steps[1:]) == report.totals["analytic"][f"{DECODE}_macs"]
    assert sum(x.nonmatmul_flops for x in steps[1:]) == report.totals["analytic"][f"{DECODE}_nonmatmul_flops"]
    if device == "cpu":  # the loop's own token choices are listed, not counted
        assert any("generation loop's own ops" in n and "argmax" in n for n in report.notes)


def test_a_change_in_the_loop_is_seen(monkeypatch):
    """A loop that feeds the whole sequence again at every step does more work than the closed form."""
    from llama_ref.generate import decode_loop as real

    def wasteful(model, prompts, max_new_tokens, pick, *, eos_id=None, all_logits=False):
        tokens = real(model, prompts, max_new_tokens, pick, eos_id=eos_id, all_logits=all_logits)
        with torch.inference_mode():
            model(tokens[:, :4])  # an extra forward the task should not need
        return tokens

    monkeypatch.setattr("counters.generation.decode_loop", wasteful)
    model = Llama(SMALL, device="meta")
    report = crosscheck_generation(model, batch=1, generation=Generation(3, 3))
    assert not report.agree
    assert {m.counter for m in report.mismatches} == {"hooks", "torch"}


def test_bad_arguments():
    model = Llama(SMALL, device="meta")
    with pytest.raises(ValueError, match="fvcore"):
        crosscheck_generation(model, batch=1, generation=Generation(2, 2), counters=["analytic", "fvcore"])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        crosscheck_generation(model, batch=1, generation=Generation(60, 10))
    with pytest.raises(ValueError, match="new_tokens"):
        Generation(3, 0)


def test_command(capsys):
    code = main(["count", "tiny", "--prompt", "6", "--generate", "5", "--batch", "2", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    doc = json.loads(out)
    assert doc["task"] == "generate"
    assert doc["generation"] == {"prompt": 6, "new_tokens": 5, "prefill_logits": "last position"}
    assert doc["counters"] == ["analytic", "hooks", "torch"] and doc["agree"]
    closed = generation_macs(PRESETS["tiny"], Generation(6, 5), batch=2)
    assert doc["totals"]["torch"]["prefill_macs"] == closed[PREFILL]
    assert doc["totals"]["torch"]["decode_macs"] == closed[DECODE]


def test_command_all_logits(capsys):
    """--all-logits: the prefill's head on every prompt position, (6 - 1) x 2 rows x 64 x 256 more MACs."""
    code = main(["count", "tiny", "--prompt", "6", "--generate", "5", "--batch", "2", "--all-logits",
                 "--format", "json"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    doc = json.loads(out)
    assert doc["agree"] and doc["generation"]["prefill_logits"] == "all positions"
    last = generation_macs(PRESETS["tiny"], Generation(6, 5), batch=2)
    assert doc["totals"]["hooks"]["prefill_macs"] == last[PREFILL] + 5 * 2 * 64 * 256


@pytest.mark.parametrize("prompt, new", [(7, 5), (1, 3)])
def test_equals_flop_counter_mode_on_transformers_generate(hf_llama_factory, prompt, new):
    """transformers' generate() (greedy, logits_to_keep=1 in its prefill) under FlopCounterMode, / 2 (it counts 2
    per MAC), equals our closed form and our counters on the real loop, phase totals summed."""
    from torch.utils.flop_counter import FlopCounterMode

    import llama_ref

    hf = hf_llama_factory()
    batch = 2
    ids = torch.randint(0, hf.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as fcm:
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=0)
    assert out.shape == (batch, prompt + new)
    ours = llama_ref.from_hf(hf)
    closed = generation_macs(ours.config, Generation(prompt, new), batch=batch)
    report = crosscheck_generation(ours, batch=batch, generation=Generation(prompt, new))
    assert report.agree
    assert fcm.get_total_flops() == 2 * (closed[PREFILL] + closed[DECODE]) == 2 * report.totals["torch"]["macs"]


@pytest.mark.parametrize("argv, needle", [
    (["--prompt", "4"], "go together"),
    (["--prompt", "4", "--generate", "2", "--train"], "drop --train"),
    (["--prompt", "4", "--generate", "2", "--counters", "fvcore"], "fvcore"),
    (["--prompt", "100", "--generate", "100"], "exceeds the model's max_seq_len"),
    (["--prompt", "4", "--generate", "0"], "--generate must be >= 1"),
    (["--tokens", "4", "--all-logits"], "add --prompt P --generate G"),
])
def test_command_bad_input(capsys, argv, needle):
    code = main(["count", "tiny", *argv])
    _, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT and needle in err and len(err.strip().splitlines()) == 1
