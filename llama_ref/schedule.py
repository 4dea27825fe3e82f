"""Layer schedules: the ordered list of decoder-layer runs a forward pass executes.

Layer-pruning and layer-repeat studies run a model with some layers skipped and others run more
than once. A schedule is a tuple of layer indices; its string form is a comma-separated list of
items ``i``, ``i-j`` (inclusive) and ``i-jxK`` / ``ixK`` (each layer of the item run K times back to
back), e.g. ``"0-5,10-13,14-18x2,19-24,29-31"``.

A schedule has at most :data:`MAX_SCHEDULE_RUNS` (10,000) layer runs. Bounds and the run count are
checked from each item's numbers before anything is expanded, so a typo like ``0-99999999999`` is
refused at once.
"""

from __future__ import annotations

import itertools
import numbers
import re
from typing import Iterable, Iterator, Optional, Sequence, Union

ScheduleSpec = Union[None, str, Sequence[int]]

_ITEM = re.compile(r"^([0-9]+)(?:-([0-9]+))?(?:x([0-9]+))?$")


def _skip(n_layers: int, skipped: Iterable[int]) -> tuple[int, ...]:
    skipped = set(skipped)
    return tuple(i for i in range(n_layers) if i not in skipped)


def _mid_expansion() -> tuple[int, ...]:
    # Skip 6-9 and 25-28, run each of 14-18 twice back to back: 6+4+10+6+3 = 29 runs.
    order: list[int] = []
    for i in _skip(32, [*range(6, 10), *range(25, 29)]):
        order.extend([i, i] if 14 <= i <= 18 else [i])
    return tuple(order)


# Presets of the layer-skipping study, defined for 32-layer models (Llama-2-7B, Llama-3-8B).
SCHEDULE_PRESETS: dict[str, tuple[int, ...]] = {
    "skip-24-26": _skip(32, range(24, 27)),
    "skip-15": _skip(32, [15]),
    "mid-expansion-with-repeats": _mid_expansion(),
    "two-thirds": _skip(32, range(11, 21)),
    "two-thirds-plus": _skip(32, [11, 13, 15, 17, 19]),
    "skip-near-end-keep-last-two": _skip(32, range(27, 30)),
}
PRESET_N_LAYERS = 32
SCHEDULE_NAMES = ("baseline", *SCHEDULE_PRESETS)


# The most layer runs a schedule may have. The deepest Llama (3.1-405B) has 126 layers; 10,000 runs
# is that model run ~80 times over. Each run is one KV-cache slot and one row in every counter's
# table, and costs ~5 ms of Python (hooks) to ~70 ms (fvcore's trace) when a 70B model is counted
# on the meta device, so 10,000 runs is about a minute to 12 minutes: the edge of usefulness, never
# a hang. Checked from the item bounds *before* a list is built, so "0-99999999999" or
# "0x100000000" are refused at once instead of after minutes and gigabytes.
MAX_SCHEDULE_RUNS = 10_000
_MAX_DIGITS = 18  # no layer index or repeat count needs more; int() of thousands of digits is slow


def _show(value, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: error messages must stay one line for a 100 MB input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _split_items(text: str) -> Iterator[str]:
    """``text.split(",")`` lazily: a huge string is refused after the first items over the cap
    instead of first being split into millions of pieces."""
    start = 0
    while True:
        comma = text.find(",", start)
        if comma < 0:
            yield text[start:]
            return
        yield text[start:comma]
        start = comma + 1


def parse_schedule(text: str, n_layers: Optional[int] = None) -> tuple[int, ...]:
    """Parse the string form (see module docstring). Raises ``ValueError`` naming the bad item.

    With ``n_layers`` every item's layer indices are checked against ``[0, n_layers)``. In any case
    the total number of layer runs must not exceed :data:`MAX_SCHEDULE_RUNS`. Both checks use the
    item bounds, before anything is expanded.
    """
    if not isinstance(text, str) or not text or text.isspace():
        raise ValueError(f"empty layer schedule {_show(text)}")
    items: list[tuple[int, int, int]] = []
    total = 0
    for raw in _split_items(text):
        item = raw.strip().replace(" ", "")
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"bad layer schedule item {_show(raw, 40)} in {_show(text)}; expected i, i-j, or i-jxK")
        for digits in m.groups():
            if digits is not None and len(digits) > _MAX_DIGITS:
                raise ValueError(f"number {_show(digits, 30)} in layer schedule item {_show(item, 40)} is too large")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        reps = int(m.group(3)) if m.group(3) is not None else 1
        if hi < lo:
            raise ValueError(f"bad layer range {_show(item, 40)} in {_show(text)}: end before start")
        if reps < 1:
            raise ValueError(f"bad repeat count in {_show(item, 40)}: must be at least 1")
        if n_layers is not None and hi >= n_layers:
            raise ValueError(f"layer index {hi} out of range for a model with {n_layers} layers "
                             f"(item {_show(item, 40)} of schedule {_show(text)})")
        total += (hi - lo + 1) * reps
        if total > MAX_SCHEDULE_RUNS:
            raise ValueError(f"layer schedule {_show(text)} asks for more than {MAX_SCHEDULE_RUNS:,} layer runs "
                             f"(item {_show(item, 40)} alone is {(hi - lo + 1) * reps:,}); that is the limit "
                             "(MAX_SCHEDULE_RUNS)")
        items.append((lo, hi, reps))
    order: list[int] = []
    for lo, hi, reps in items:
        for i in range(lo, hi + 1):
            order.extend([i] * reps)
    return tuple(order)


def format_schedule(order: Sequence[int]) -> str:
    """Compact string form of a schedule; ``parse_schedule(format_schedule(s)) == tuple(s)``."""
    # Group back-to-back repeats into (layer, reps), then runs of consecutive layers with equal reps.
    groups: list[list[int]] = []  # [layer, reps]
    for i in order:
        if groups and groups[-1][0] == i:
            groups[-1][1] += 1
        else:
            groups.append([i, 1])
    items: list[str] = []
    start = 0
    while start < len(groups):
        end = start
        while (end + 1 < len(groups) and groups[end + 1][0] == groups[end][0] + 1
               and groups[end + 1][1] == groups[start][1]):
            end += 1
        lo, hi, reps = groups[start][0], groups[end][0], groups[start][1]
        item = str(lo) if lo == hi else f"{lo}-{hi}"
        items.append(item + (f"x{reps}" if reps > 1 else ""))
        start = end + 1
    return ",".join(items)


def resolve_schedule(spec: ScheduleSpec, n_layers: int) -> tuple[int, ...]:
    """Turn a preset name, a string form or a sequence of layer indices into a validated tuple."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, numbers.Integral) or n_layers <= 0:
        raise ValueError(f"n_layers must be a positive int, got {_show(n_layers)}")
    # isinstance first: ``array == "baseline"`` would compare elementwise.
    if spec is None or (isinstance(spec, str) and spec == "baseline"):
        if n_layers > MAX_SCHEDULE_RUNS:
            # Also what keeps Llama(config) with n_layers=10**9 from building layers for hours.
            raise ValueError(f"a model with {n_layers:,} layers runs more than {MAX_SCHEDULE_RUNS:,} layers per forward, "
                             "the limit (MAX_SCHEDULE_RUNS)")
        return tuple(range(n_layers))
    if isinstance(spec, str):
        if not spec or spec.isspace():
            raise ValueError(f"empty layer schedule {_show(spec)}: a model must run at least one layer")
        if spec in SCHEDULE_PRESETS:
            if n_layers != PRESET_N_LAYERS:
                raise ValueError(
                    f"schedule preset {spec!r} is defined for {PRESET_N_LAYERS}-layer models; "
                    f"this model has {n_layers} layers"
                )
            order = SCHEDULE_PRESETS[spec]
        elif _ITEM.match(next(_split_items(spec)).strip().replace(" ", "")):
            order = parse_schedule(spec, n_layers)
        else:
            raise ValueError(
                f"unknown layer schedule {_show(spec)}; use a preset ({', '.join(SCHEDULE_NAMES)}) "
                "or a list like '0-23,27-31' or '0-13,14-18x2,19-31'"
            )
    else:
        try:
            if isinstance(spec, (bytes, bytearray)):
                raise TypeError
            entries = iter(spec)
        except TypeError:
            raise ValueError(f"a layer schedule must be a name, a string or a sequence of ints, got {_show(spec)}") from None
        # At most one entry past the cap is taken: range(10**12) or an endless generator is refused,
        # not expanded.
        order = tuple(itertools.islice(entries, MAX_SCHEDULE_RUNS + 1))
        if len(order) > MAX_SCHEDULE_RUNS:
            raise ValueError(f"layer schedule {_show(spec)} has more than {MAX_SCHEDULE_RUNS:,} layer runs, "
                             "the limit (MAX_SCHEDULE_RUNS)")
        for i in order:
            # numbers.Integral admits numpy ints too; bool is an int subclass but never a layer index.
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise ValueError(f"layer schedule entries must be ints, got {_show(i)} in {_show(spec)}")
        order = tuple(int(i) for i in order)
    if not order:
        raise ValueError("empty layer schedule: a model must run at least one layer")
    bad = sorted({i for i in order if not 0 <= i < n_layers})
    if bad:
        raise ValueError(f"layer index {bad[0]} out of range for a model with {n_layers} layers "
                         f"(schedule {_show(spec)})")
    return tuple(order)
