"""Layer schedules: the ordered list of decoder-layer runs a forward pass executes.

Layer-pruning and layer-repeat studies run a model with some layers skipped and others run more
than once. A schedule is a tuple of layer indices; its string form is a comma-separated list of
items ``i``, ``i-j`` (inclusive) and ``i-jxK`` / ``ixK`` (each layer of the item run K times back to
back), e.g. ``"0-5,10-13,14-18x2,19-24,29-31"``.
"""

from __future__ import annotations

import numbers
import re
from typing import Iterable, Sequence, Union

ScheduleSpec = Union[None, str, Sequence[int]]

_ITEM = re.compile(r"^(\d+)(?:-(\d+))?(?:x(\d+))?$")


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


def parse_schedule(text: str) -> tuple[int, ...]:
    """Parse the string form (see module docstring). Raises ``ValueError`` naming the bad item."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty layer schedule {text!r}")
    order: list[int] = []
    for raw in text.split(","):
        item = raw.strip().replace(" ", "")
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"bad layer schedule item {raw!r} in {text!r}; expected i, i-j, or i-jxK")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        reps = int(m.group(3)) if m.group(3) is not None else 1
        if hi < lo:
            raise ValueError(f"bad layer range {item!r} in {text!r}: end before start")
        if reps < 1:
            raise ValueError(f"bad repeat count in {item!r}: must be at least 1")
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
    # isinstance first: ``array == "baseline"`` would compare elementwise.
    if spec is None or (isinstance(spec, str) and spec == "baseline"):
        return tuple(range(n_layers))
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError(f"empty layer schedule {spec!r}: a model must run at least one layer")
        if spec in SCHEDULE_PRESETS:
            if n_layers != PRESET_N_LAYERS:
                raise ValueError(
                    f"schedule preset {spec!r} is defined for {PRESET_N_LAYERS}-layer models; "
                    f"this model has {n_layers} layers"
                )
            order = SCHEDULE_PRESETS[spec]
        elif _ITEM.match(spec.split(",")[0].strip().replace(" ", "")):
            order = parse_schedule(spec)
        else:
            raise ValueError(
                f"unknown layer schedule {spec!r}; use a preset ({', '.join(SCHEDULE_NAMES)}) "
                "or a list like '0-23,27-31' or '0-13,14-18x2,19-31'"
            )
    else:
        try:
            order = tuple(spec)
        except TypeError:
            raise ValueError(f"a layer schedule must be a name, a string or a sequence of ints, got {spec!r}") from None
        for i in order:
            # numbers.Integral admits numpy ints too; bool is an int subclass but never a layer index.
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise ValueError(f"layer schedule entries must be ints, got {i!r} in {spec!r}")
        order = tuple(int(i) for i in order)
    if not order:
        raise ValueError("empty layer schedule: a model must run at least one layer")
    bad = sorted({i for i in order if not 0 <= i < n_layers})
    if bad:
        raise ValueError(f"layer index {bad[0]} out of range for a model with {n_layers} layers (schedule {spec!r})")
    return tuple(order)
