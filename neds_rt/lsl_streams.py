"""LSL StreamInfo builders and parsers for neds-rt's streams (DESIGN.md, "Runtime contracts").

- ``Spikes``: irregular rate, int32, one channel (unit index), one sample per spike stamped with its time.
- ``SpikeCounts``: 1 / bin size Hz, int32, one channel per unit; a sample's timestamp is its bin START.
- ``Behavior``: 50 Hz, float32, labelled channels with units; a sample's timestamp is its bin END.

Spike streams describe their units in ``desc()``::

    <desc><session_id>EID</session_id><bin_size_s>0.02</bin_size_s><timestamp>...</timestamp>
          <units><unit><index>0</index><id>...</id><region>CA1</region></unit>...</units>
          <channels><channel><label>unit_index</label>...</channel></channels></desc>
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from neds_rt.binning import BIN_SIZE_S
from neds_rt.errors import StreamError, invalid
from neds_rt.lsl_scope import pylsl

SPIKES_TYPE: Final = "Spikes"
COUNTS_TYPE: Final = "SpikeCounts"
BEHAVIOR_TYPE: Final = "Behavior"
BEHAVIOR_RATE_HZ: Final = 50.0


class StreamUnits(NamedTuple):
    """The unit metadata a spike stream carries: ids, brain regions (same order) and the session id."""

    unit_ids: tuple[str, ...]
    regions: tuple[str, ...]
    session_id: str


def _check_units(unit_ids: Sequence[object], regions: Sequence[object]) -> tuple[list[str], list[str]]:
    ids = [str(u) for u in unit_ids]
    regs = [str(r) for r in regions]
    if len(ids) == 0:
        raise invalid("unit_ids", "a spike stream needs at least one unit", 0, kind=StreamError)
    if len(ids) != len(regs):
        raise invalid("regions", "need one region per unit id", (len(ids), len(regs)), kind=StreamError)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = [u for u in ids if u in seen or seen.add(u)][:5]  # type: ignore[func-returns-value]
        raise invalid("unit_ids", "must be unique", dup, "deduplicate the units table", kind=StreamError)
    return ids, regs


def _add_units(
    info: Any, session_id: str, ids: list[str], regs: list[str], bin_size: float, stamp: str
) -> None:
    desc = info.desc()
    desc.append_child_value("session_id", str(session_id))
    desc.append_child_value("bin_size_s", repr(float(bin_size)))
    desc.append_child_value("timestamp", stamp)
    units = desc.append_child("units")
    for i, (u, r) in enumerate(zip(ids, regs, strict=True)):
        el = units.append_child("unit")
        el.append_child_value("index", str(i))
        el.append_child_value("id", u)
        el.append_child_value("region", r)


def spike_stream_info(
    name: str,
    session_id: str,
    unit_ids: Sequence[object],
    regions: Sequence[object],
    source_id: str,
    bin_size: float = BIN_SIZE_S,
) -> Any:
    """StreamInfo of a ``Spikes`` stream: one int32 sample (unit index) per spike, irregular rate."""
    ids, regs = _check_units(unit_ids, regions)
    lsl = pylsl()
    info = lsl.StreamInfo(name, SPIKES_TYPE, 1, lsl.IRREGULAR_RATE, lsl.cf_int32, source_id)
    _add_units(info, session_id, ids, regs, bin_size, "spike_time")
    info.set_channel_labels(["unit_index"])
    return info


def counts_stream_info(
    name: str,
    session_id: str,
    unit_ids: Sequence[object],
    regions: Sequence[object],
    source_id: str,
    bin_size: float = BIN_SIZE_S,
) -> Any:
    """StreamInfo of a ``SpikeCounts`` stream: int32 channel per unit, 1 / bin_size Hz, bin-start stamps."""
    ids, regs = _check_units(unit_ids, regions)
    if not bin_size > 0:
        raise invalid("bin_size", "must be > 0 s", bin_size, kind=StreamError)
    lsl = pylsl()
    info = lsl.StreamInfo(name, COUNTS_TYPE, len(ids), 1.0 / bin_size, lsl.cf_int32, source_id)
    _add_units(info, session_id, ids, regs, bin_size, "bin_start")
    info.set_channel_labels(ids)
    return info


def behavior_stream_info(
    name: str,
    channels: Sequence[tuple[str, str]],
    source_id: str,
    rate_hz: float = BEHAVIOR_RATE_HZ,
    session_id: str = "",
) -> Any:
    """StreamInfo of a ``Behavior`` stream: float32, labelled channels ``(label, unit)``, bin-end stamps."""
    if len(channels) == 0:
        raise invalid("channels", "a Behavior stream needs at least one channel", 0, kind=StreamError)
    labels = [str(c[0]) for c in channels]
    if len(set(labels)) != len(labels):
        raise invalid("channels", "labels must be unique", labels, kind=StreamError)
    lsl = pylsl()
    info = lsl.StreamInfo(name, BEHAVIOR_TYPE, len(labels), rate_hz, lsl.cf_float32, source_id)
    info.desc().append_child_value("session_id", str(session_id))
    info.desc().append_child_value("timestamp", "bin_end")
    info.set_channel_labels(labels)
    info.set_channel_units([str(c[1]) for c in channels])
    info.set_channel_types("behavior")
    return info


def _children(node: Any, name: str) -> list[Any]:
    out = []
    ch = node.child(name)
    while not ch.empty():
        out.append(ch)
        ch = ch.next_sibling(name)
    return out


def units_from_info(info: Any) -> StreamUnits:
    """Read ``(unit_ids, regions, session_id)`` from a Spikes / SpikeCounts StreamInfo.

    Pass the full info (``inlet.info()``), not a resolve result's header-only copy.
    """
    what = f"LSL stream {info.name()!r} ({info.type()})"
    desc = info.desc()
    units = desc.child("units")
    if units.empty():
        raise invalid(
            what,
            "desc() has no <units> list",
            None,
            "publish with neds_rt.lsl_streams.spike_stream_info (or pass the full info)",
            kind=StreamError,
        )
    ids: list[str] = []
    regs: list[str] = []
    for i, el in enumerate(_children(units, "unit")):
        idx, uid = el.child_value("index"), el.child_value("id")
        if uid == "":
            raise invalid(what, f"unit {i} in desc() has no <id>", None, kind=StreamError)
        if idx != "" and idx != str(i):
            raise invalid(
                what,
                f"unit {i} in desc() has <index> {idx}; units must be listed in index order",
                idx,
                kind=StreamError,
            )
        ids.append(uid)
        regs.append(el.child_value("region"))
    if not ids:
        raise invalid(what, "desc() <units> list is empty", None, kind=StreamError)
    if info.type() == COUNTS_TYPE and info.channel_count() != len(ids):
        raise invalid(
            what,
            "SpikeCounts needs one channel per listed unit",
            (info.channel_count(), len(ids)),
            kind=StreamError,
        )
    sid = desc.child_value("session_id")
    return StreamUnits(tuple(ids), tuple(regs), sid)


def bin_size_from_info(info: Any) -> float | None:
    """The ``bin_size_s`` a spike stream declares in desc(), or None when it declares none."""
    raw = info.desc().child_value("bin_size_s")
    try:
        return float(raw) if raw else None
    except ValueError:
        raise invalid(
            f"LSL stream {info.name()!r}", "desc() bin_size_s is not a number", raw, kind=StreamError
        ) from None


def channels_from_info(info: Any) -> list[tuple[str, str]]:
    """The ``(label, unit)`` of each channel of a Behavior StreamInfo, in channel order."""
    chans = info.desc().child("channels")
    out = [(el.child_value("label"), el.child_value("unit")) for el in _children(chans, "channel")]
    if len(out) != info.channel_count() or any(lbl == "" for lbl, _ in out):
        raise invalid(
            f"LSL stream {info.name()!r}",
            "desc() must label every channel",
            [lbl for lbl, _ in out],
            kind=StreamError,
        )
    return out
