"""Layer schedules: exact presets, string round trip, hand-built references, one KV slot per run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_ref import SCHEDULE_NAMES, SCHEDULE_PRESETS, Llama, format_schedule, parse_schedule, resolve_schedule

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5


def _tokens(bsz, seqlen, vocab, seed=0):
    return torch.randint(0, vocab, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


def _skip(*ranges):
    skipped = {i for r in ranges for i in r}
    return [i for i in range(32) if i not in skipped]


# ---------------------------------------------------------------- presets, spelled out independently
EXPECTED_PRESETS = {
    "baseline": list(range(32)),
    "skip-24-26": [*range(0, 24), *range(27, 32)],
    "skip-15": _skip([15]),
    "mid-expansion-with-repeats": [*range(0, 6), *range(10, 14), 14, 14, 15, 15, 16, 16, 17, 17, 18, 18,
                                   *range(19, 25), 29, 30, 31],
    "two-thirds": _skip(range(11, 21)),
    "two-thirds-plus": _skip([11, 13, 15, 17, 19]),
    "skip-near-end-keep-last-two": _skip(range(27, 30)),
}


def test_preset_names():
    assert set(SCHEDULE_NAMES) == set(EXPECTED_PRESETS)
    assert set(SCHEDULE_PRESETS) == set(EXPECTED_PRESETS) - {"baseline"}


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_presets_exact(name):
    assert resolve_schedule(name, 32) == tuple(EXPECTED_PRESETS[name])


def test_mid_expansion_has_29_runs():
    order = resolve_schedule("mid-expansion-with-repeats", 32)
    assert len(order) == 29
    assert not set(order) & {6, 7, 8, 9, 25, 26, 27, 28}
    assert all(order.count(i) == 2 for i in range(14, 19))


# ---------------------------------------------------------------- string form
@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_preset_string_form_round_trips(name):
    order = resolve_schedule(name, 32)
    text = format_schedule(order)
    assert parse_schedule(text) == order
    assert resolve_schedule(text, 32) == order


def test_string_forms():
    assert format_schedule(EXPECTED_PRESETS["mid-expansion-with-repeats"]) == "0-5,10-13,14-18x2,19-24,29-31"
    assert format_schedule(EXPECTED_PRESETS["skip-24-26"]) == "0-23,27-31"
    assert parse_schedule("0-2, 5x3 ,7") == (0, 1, 2, 5, 5, 5, 7)
    assert parse_schedule("3-4x2") == (3, 3, 4, 4)


def test_random_schedules_round_trip():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        # Small values so that repeats and consecutive runs are frequent.
        order = tuple(torch.randint(0, 6, (n,), generator=gen).tolist())
        assert parse_schedule(format_schedule(order)) == order, order


def test_sequence_specs():
    assert resolve_schedule([3, 1, 1], 4) == (3, 1, 1)
    assert resolve_schedule(range(2), 4) == (0, 1)
    assert resolve_schedule(np.array([2, 0]), 4) == (2, 0)
    assert resolve_schedule(None, 5) == tuple(range(5))
    assert resolve_schedule("baseline", 5) == tuple(range(5))


@pytest.mark.parametrize(
    "spec, n_layers, match",
    [
        ("skip-16", 32, "unknown layer schedule 'skip-16'"),
        ("Baseline", 32, "unknown layer schedule 'Baseline'"),
        ("0-3,foo", 32, "bad layer schedule item 'foo'"),
        ("5-3", 32, "bad layer range '5-3'"),
        ("2x0", 32, "bad repeat count in '2x0'"),
        ("0-32", 32, "layer index 32 out of range for a model with 32 layers"),
        ([0, 4], 4, "layer index 4 out of range for a model with 4 layers"),
        ([-1, 0], 4, "layer index -1 out of range"),
        ([], 4, "empty layer schedule"),
        ("", 4, "empty layer schedule"),
        ("  ", 4, "empty layer schedule"),
        ([0, 1.0], 4, "entries must be ints, got 1.0"),
        ([0, True], 4, "entries must be ints, got True"),
        (5, 4, "got 5"),
        ("skip-15", 4, "'skip-15' is defined for 32-layer models; this model has 4 layers"),
    ],
)
def test_bad_schedules(spec, n_layers, match):
    with pytest.raises(ValueError, match=match):
        resolve_schedule(spec, n_layers)


def test_model_rejects_bad_schedule(tiny_config):
    with pytest.raises(ValueError, match="layer index 7 out of range for a model with 4 layers"):
        Llama(tiny_config, schedule=[0, 7], device="meta")
    model = Llama(tiny_config, device="meta")
    with pytest.raises(ValueError, match="unknown layer schedule 'nope'"):
        model.set_schedule("nope")


# ---------------------------------------------------------------- hand-built references
def _manual_forward(model: Llama, tokens: torch.Tensor, layer_ids) -> torch.Tensor:
    """The model's forward written out by hand for a given list of layer runs (no cache)."""
    seqlen = tokens.shape[1]
    h = model.tok_embeddings(tokens).float()  # (bsz, seqlen, dim)
    freqs = model.freqs_cis[:seqlen]  # (seqlen, head_dim // 2)
    mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)  # (seqlen, seqlen)
    for i in layer_ids:
        layer = model.layers[i]
        h = h + layer.attention(layer.attention_norm(h), 0, freqs, mask)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()  # (bsz, seqlen, vocab)


@pytest.mark.parametrize("order", [[0, 0], [3, 1], [0, 1, 1, 2, 3, 3, 3], [2]])
def test_schedule_equals_manual_application(tiny_config, make_model, order):
    model = make_model(tiny_config, schedule=order)
    tokens = _tokens(2, 9, tiny_config.vocab_size)
    expected = _manual_forward(model, tokens, order)
    torch.testing.assert_close(model(tokens), expected, atol=ATOL, rtol=0)
    # And the schedule matters: running layer 0 twice is not running it once.
    if order == [0, 0]:
        assert (model(tokens) - _manual_forward(model, tokens, [0])).abs().max() > 1e-2


def test_set_schedule_switches_and_drops_cache(tiny_config, make_model):
    model = make_model(tiny_config)
    tokens = _tokens(1, 5, tiny_config.vocab_size)
    model.setup_cache(1, 8)
    model.set_schedule("0,2")
    assert model.caches is None and model.schedule == (0, 2) and format_schedule(model.schedule) == "0,2"
    torch.testing.assert_close(model(tokens), _manual_forward(model, tokens, [0, 2]), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- KV cache under every preset
def _decode(model: Llama, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    bsz, seqlen = tokens.shape
    model.setup_cache(bsz, seqlen)
    outs = [model(tokens[:, :prefill])]
    outs += [model(tokens[:, p : p + 1], start_pos=p) for p in range(prefill, seqlen)]
    return torch.cat(outs, 1)  # (bsz, seqlen, vocab)


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_cached_decoding_equals_full_forward_under_every_preset(deep_tiny_config, make_model, name):
    model = make_model(deep_tiny_config, gain=1.0, schedule=name)
    tokens = _tokens(2, 10, deep_tiny_config.vocab_size, seed=1)
    full = model(tokens)
    torch.testing.assert_close(_decode(model, tokens, prefill=4), full, atol=ATOL, rtol=0)


def test_sharing_one_slot_for_a_repeated_layer_would_be_wrong(deep_tiny_config, make_model):
    """Each *run* owns a cache slot. If both runs of a repeated layer shared one (a per-layer cache),
    the second run would overwrite the first run's keys/values and decoding would diverge."""
    model = make_model(deep_tiny_config, gain=1.0, schedule="mid-expansion-with-repeats")
    tokens = _tokens(2, 10, deep_tiny_config.vocab_size, seed=2)
    full = model(tokens)
    torch.testing.assert_close(_decode(model, tokens, prefill=4), full, atol=ATOL, rtol=0)

    # Now wire a per-layer cache: every run of layer i uses the slot of its first run.
    order = model.schedule
    model.setup_cache(2, 10)
    first_slot = {}
    for pos, layer_id in enumerate(order):
        first_slot.setdefault(layer_id, pos)
    shared = torch.nn.ModuleList(model.caches[first_slot[layer_id]] for layer_id in order)
    original_setup = model.setup_cache
    model.setup_cache = lambda *a, **k: (original_setup(*a, **k), setattr(model, "caches", shared))
    try:
        wrong = _decode(model, tokens, prefill=4)
    finally:
        del model.setup_cache  # back to the class method
    # The prefill itself is unaffected (each run writes, then reads, its own fresh keys) ...
    torch.testing.assert_close(wrong[:, :4], full[:, :4], atol=ATOL, rtol=0)
    # ... but every decode step reads the other run's keys for the prefix.
    assert (wrong[:, 4:] - full[:, 4:]).abs().max() > 1e-2


def test_cached_decoding_with_repeats_sdpa(deep_tiny_config, make_model):
    model = make_model(deep_tiny_config, gain=1.0, schedule="0-3,4x3,5-31", attn_kernel="sdpa")
    tokens = _tokens(3, 9, deep_tiny_config.vocab_size, seed=3)
    torch.testing.assert_close(_decode(model, tokens, prefill=2), model(tokens), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- bounds and the run cap, before expanding
def test_run_cap_boundary():
    from llama_ref.schedule import MAX_SCHEDULE_RUNS

    assert MAX_SCHEDULE_RUNS == 10_000
    assert len(parse_schedule("0-9999")) == 10_000  # exactly the cap: accepted
    assert len(resolve_schedule("0-3x2500", 4)) == 10_000  # 4 layers x 2500 = 10,000
    assert len(resolve_schedule([1] * 10_000, 4)) == 10_000
    with pytest.raises(ValueError, match="more than 10,000 layer runs"):
        parse_schedule("0-9999,0")  # 10,001
    with pytest.raises(ValueError, match="more than 10,000 layer runs"):
        resolve_schedule("0-3x2500,1", 4)
    with pytest.raises(ValueError, match="more than 10,000 layer runs"):
        resolve_schedule([1] * 10_001, 4)


def test_parse_schedule_checks_bounds_when_told_n_layers():
    assert parse_schedule("0-3x2", n_layers=4) == (0, 0, 1, 1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match="layer index 4 out of range for a model with 4 layers .*item '2-4'"):
        parse_schedule("0,2-4", n_layers=4)


@pytest.mark.parametrize("spec", ["0-99999999999", "0x100000000", "5-5x99999999999999", "0-3," * 100_000 + "0"])
def test_huge_schedules_are_refused_without_building_them(spec):
    """Refused from the item bounds: today's cost was a 400 s hang at 3.7 GB for '0-99999999999'.
    Peak Python allocation during the refusal stays far below one expanded list (10**8 ints = 800 MB)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="out of range|more than 10,000"):
            resolve_schedule(spec, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


def test_long_specs_give_short_messages():
    spec = "0-3," * 100_000 + "oops"
    with pytest.raises(ValueError) as info:
        resolve_schedule(spec, 4)
    assert len(str(info.value)) < 400


def test_non_ascii_digits_are_not_layer_indices():
    # '\\d' would accept Arabic-Indic digits and int() would parse them; a schedule is ASCII.
    with pytest.raises(ValueError, match="unknown layer schedule"):
        resolve_schedule("\u0661-\u0663", 4)
