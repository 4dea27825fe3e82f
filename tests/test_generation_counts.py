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
    assert got[PREFILL] == a * 512 + b * 512 ** 2
    # 127 steps attending to 513 ... 639 positions: 127 a + b (127 * 512 + 128 * 127 / 2)
    assert got[DECODE] == 127 * a + b * (127 * 512 + 8128)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("kernel", ["math", "sdpa"])
def test_the_real_loop_agrees_with_the_closed_form(device, kernel):
    model = Llama(SMALL, device=device, attn_kernel=kernel, schedule="0,1x2,2")
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

    steps = [analyze(SMALL, batch=2, n_tokens=n, n_cached=s, schedule="0,1x2,2") for s, n in generation_forwards(g)]
    assert sum(x.macs for x in steps[1:]) == report.totals["analytic"][f"{DECODE}_macs"]
    assert sum(x.nonmatmul_flops for x in steps[1:]) == report.totals["analytic"][f"{DECODE}_nonmatmul_flops"]
    if device == "cpu":  # the loop's own token choices are listed, not counted
        assert any("generation loop's own ops" in n and "argmax" in n for n in report.notes)


def test_a_change_in_the_loop_is_seen(monkeypatch):
    """A loop that feeds the whole sequence again at every step does more work than the closed form."""
    from llama_ref.generate import decode_loop as real

    def wasteful(model, prompts, max_new_tokens, pick, *, eos_id=None):
        tokens = real(model, prompts, max_new_tokens, pick, eos_id=eos_id)
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
    assert doc["task"] == "generate" and doc["generation"] == {"prompt": 6, "new_tokens": 5}
    assert doc["counters"] == ["analytic", "hooks", "torch"] and doc["agree"]
    closed = generation_macs(PRESETS["tiny"], Generation(6, 5), batch=2)
    assert doc["totals"]["torch"]["prefill_macs"] == closed[PREFILL]
    assert doc["totals"]["torch"]["decode_macs"] == closed[DECODE]


@pytest.mark.parametrize("argv, needle", [
    (["--prompt", "4"], "go together"),
    (["--prompt", "4", "--generate", "2", "--train"], "drop --train"),
    (["--prompt", "4", "--generate", "2", "--counters", "fvcore"], "fvcore"),
    (["--prompt", "100", "--generate", "100"], "exceeds the model's max_seq_len"),
    (["--prompt", "4", "--generate", "0"], "--generate must be >= 1"),
])
def test_command_bad_input(capsys, argv, needle):
    code = main(["count", "tiny", *argv])
    _, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT and needle in err and len(err.strip().splitlines()) == 1
