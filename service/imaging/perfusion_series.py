"""Perfusion acquisitions as 4D arrays with a time axis, and vendor perfusion maps as volumes.

Array contract (see ``service.imaging.geometry``): frames are float32 ``[time, slice, row,
column]``, slices ordered by position along the slice normal (increasing), frames by time
(increasing). Times are seconds after the first frame, as measured (sampling need not be
uniform).

How instances are split into time points, first rule that works:

- CT perfusion: AcquisitionNumber, else AcquisitionTime (else ContentTime), else
  SeriesInstanceUID (one series per time point), else the repeats of each slice position in
  InstanceNumber order.
- DSC perfusion: TemporalPositionIdentifier, else the time, else AcquisitionNumber, else
  SeriesInstanceUID, else the repeats in InstanceNumber order.

A rule "works" when every instance has the value and it splits the instances into exactly as
many groups as a slice position has images, each group holding each position at most once.
So a constant AcquisitionNumber (common when every time point is its own series) or
per-slice acquisition times (sequential or shuttle modes, 2D EPI) fall through to the next rule.

Every study that cannot be a perfusion series (missing slices at a time point, one or too few
time points, geometry that changes between time points, gantry tilt, times that repeat or run
backwards, a slab split into several series) is an ``InputError`` whose message says why.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date

import numpy as np
from pydicom.dataset import Dataset

from service.errors import InputError
from service.imaging.geometry import Geometry
from service.imaging.volumes import (
    POSITION_TOLERANCE_MM,
    Source,
    Volume,
    acquisition_seconds,
    load_volume,
    read_datasets,
)

MIN_CTP_TIME_POINTS = 10
"""Fewer CT perfusion time points than this cannot sample a bolus passage."""
MIN_DSC_TIME_POINTS = 8
"""Fewer DSC time points than this cannot sample a bolus passage (as ``ClassifyRules.min_dynamic_frames``)."""
TIME_TOLERANCE_S = 0.001
"""Two instance times closer than this are the same time; two frames closer than this are duplicates."""
GRID_TOLERANCE_MM = 0.01
"""Two grids whose voxel-to-patient matrices differ by less than this are the same grid."""

_TIME = "AcquisitionTime"  # name of the time rule (AcquisitionTime, else ContentTime)
_SERIES = "SeriesInstanceUID"
_REPEATS = "InstanceNumber"
_CT_RULES = ("AcquisitionNumber", _TIME, _SERIES, _REPEATS)
_DSC_RULES = ("TemporalPositionIdentifier", _TIME, "AcquisitionNumber", _SERIES, _REPEATS)


@dataclass(eq=False)
class PerfusionVolume:
    """One dynamic (perfusion) acquisition.

    ``frames`` is float32 ``[time, slice, row, column]``: HU for CT (rescale applied), signal
    for DSC (the modality rescale, when an MR series carries one, is applied; it leaves S/S0
    unchanged when its intercept is 0). ``times_s`` (float64, shape (time,)) are seconds after
    the first frame, ``times_s[0] == 0``; a frame's time is the mean of its slices' times.
    ``slice_times_s`` (time, slice) are the slices' own times on the same clock, or None
    when the headers carry no times (then ``times_s`` came from ``frame_interval_s`` or TR).
    ``headers[t][k]`` is the pixel-free header of frame ``t``, slice ``k``.
    ``start_seconds`` is the first frame's acquisition time in seconds after midnight of its
    day. ``grouped_by`` names the rule that split the time points.
    """

    geometry: Geometry
    frames: np.ndarray
    times_s: np.ndarray
    headers: list[list[Dataset]]
    series_uids: tuple[str, ...]
    modality: str
    description: str
    grouped_by: str
    slice_times_s: np.ndarray | None = None
    start_seconds: float | None = None
    echo_time_s: float | None = None
    repetition_time_s: float | None = None

    @property
    def n_frames(self) -> int:
        """Number of time points."""
        return int(self.frames.shape[0])

    def as_volume(self) -> Volume:
        """The same data as a 4D ``Volume`` (headers frame-major, ``frame_values`` = times)."""
        return Volume(
            geometry=self.geometry,
            pixels=self.frames,
            headers=[h for frame in self.headers for h in frame],
            series_uid=self.series_uids[0],
            modality=self.modality,
            description=self.description,
            frame_values=tuple(float(t) for t in self.times_s),
        )


# --- CT perfusion and DSC -------------------------------------------------------------------


def load_ctp(
    datasets: Iterable[Source] | Mapping[str, Iterable[Source]],
    *,
    min_time_points: int = MIN_CTP_TIME_POINTS,
    frame_interval_s: float | None = None,
) -> PerfusionVolume:
    """A CT perfusion acquisition (one series, or one series per time point) in HU.

    ``datasets`` are Datasets or file paths, or a mapping (e.g. from ``group_series``) whose
    values are. ``frame_interval_s`` gives the times when the headers carry none (frame ``t``
    at ``t * frame_interval_s``); otherwise headers without times are an InputError.
    """
    instances = _flatten(datasets)
    _require_modality(instances, "CT", "CT perfusion")
    return _load_dynamic(instances, _CT_RULES, "CT perfusion", min_time_points, frame_interval_s)


def load_dsc(
    datasets: Iterable[Source] | Mapping[str, Iterable[Source]],
    *,
    min_time_points: int = MIN_DSC_TIME_POINTS,
    frame_interval_s: float | None = None,
) -> PerfusionVolume:
    """A DSC-PWI acquisition: signal frames, the echo time (s) and the repetition time (s).

    TE is required (dR2*(t) = -ln(S(t)/S0) / TE); one TE only (multi-echo is refused). When
    the headers carry no times, frame ``t`` is at ``t * frame_interval_s``, else ``t * TR``.
    """
    instances = _flatten(datasets)
    _require_modality(instances, "MR", "DSC perfusion")
    echo_ms = _single_value(instances, "EchoTime", "DSC perfusion")
    if echo_ms is None:
        raise InputError(
            f"{_where(instances)}: DSC perfusion without EchoTime: the echo time is needed to turn "
            "signal into dR2* = -ln(S/S0)/TE"
        )
    if echo_ms <= 0:
        raise InputError(f"{_where(instances)}: DSC perfusion with EchoTime {echo_ms:g} ms; it must be positive")
    repetition_ms = _single_value(instances, "RepetitionTime", "DSC perfusion", required_everywhere=False)
    repetition_s = repetition_ms / 1000.0 if repetition_ms and repetition_ms > 0 else None
    interval = frame_interval_s if frame_interval_s is not None else repetition_s
    volume = _load_dynamic(instances, _DSC_RULES, "DSC perfusion", min_time_points, interval)
    volume.echo_time_s = echo_ms / 1000.0
    volume.repetition_time_s = repetition_s
    return volume


def _load_dynamic(
    instances: list[Dataset], rules: Sequence[str], what: str, min_time_points: int, interval: float | None
) -> PerfusionVolume:
    where = _where(instances)
    for ds in instances:
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise InputError(f"{where}: multi-frame (enhanced) images are not supported in {what}")
    position = _position_indices(instances, where)
    _check_split_slab(instances, position, where)

    frames_of, rule = _split_time_points(instances, position, rules, where)
    n_positions = int(position.max()) + 1
    n_frames = len(frames_of)
    if n_frames == 1:
        raise InputError(
            f"{where}: a single time point ({len(instances)} images, one per slice position): "
            f"not a dynamic {what} series"
        )
    labels = [_frame_label(instances, group, rule, t, n_frames) for t, group in enumerate(frames_of)]
    for t, group in enumerate(frames_of):
        present = {int(position[i]) for i in group}
        if len(present) < n_positions:
            lacking = n_positions - len(present)
            raise InputError(
                f"{where}: missing images: {labels[t]} lacks {lacking} of {n_positions} slice positions "
                f"(slice {', '.join(str(k + 1) for k in sorted(set(range(n_positions)) - present))} "
                "counting along the normal)"
            )
    if n_frames < min_time_points:
        raise InputError(
            f"{where}: too few time points for {what}: {n_frames} (at least {min_time_points} needed "
            "to sample the bolus passage)"
        )

    seconds = _instance_seconds(instances)
    if seconds is not None:
        slice_times = np.empty((n_frames, n_positions))
        for t, group in enumerate(frames_of):
            slice_times[t, position[group]] = seconds[group]
        frame_times = slice_times.mean(axis=1)
        steps = np.diff(frame_times)
        if np.any(np.abs(steps) < TIME_TOLERANCE_S):
            k = int(np.argmin(np.abs(steps)))
            raise InputError(
                f"{where}: duplicate times: {labels[k]} and {labels[k + 1]} were both acquired at "
                f"{frame_times[k] - frame_times[0]:.3f} s"
            )
        if np.any(steps < 0):
            k = int(np.argmin(steps))
            raise InputError(
                f"{where}: non-monotonic times: {labels[k + 1]} was acquired {-steps[k]:.3f} s before "
                f"{labels[k]} (ordered by {rule})"
            )
    elif interval is None or interval <= 0:
        raise InputError(
            f"{where}: no acquisition times (AcquisitionTime, ContentTime) in the {what} headers: "
            "the time axis is unknown"
        )

    volumes = []
    frames: np.ndarray | None = None  # filled frame by frame: no second full-size copy (np.stack)
    for t, group in enumerate(frames_of):
        frame = [instances[i] for i in group]
        uids = {str(ds.get("SeriesInstanceUID", "?")) for ds in frame}
        if len(uids) > 1:
            raise InputError(
                f"{where}: {labels[t]} mixes images of {len(uids)} series: pass one acquisition "
                "(two reconstructions of the same scan?)"
            )
        try:
            volume = load_volume(frame)
        except InputError as error:
            reason = str(error).removeprefix(f"series {next(iter(uids))}: ")
            raise InputError(f"{where}: {labels[t]}: {reason}") from error
        if frames is None:
            frames = np.empty((n_frames, *volume.pixels.shape), dtype=np.float32)
        if volume.pixels.shape == frames.shape[1:]:  # otherwise the geometry check below reports it
            frames[t] = volume.pixels
        volumes.append(replace(volume, pixels=None))
    reference = volumes[0].geometry
    for t, volume in enumerate(volumes[1:], start=1):
        difference = _grid_difference(volume.geometry, reference)
        if difference:
            raise InputError(
                f"{where}: inconsistent geometry across time points: {labels[t]} and {labels[0]} "
                f"differ in {difference}"
            )

    if seconds is not None:
        start = float(frame_times[0])
        times_s = frame_times - start
        slice_times_s: np.ndarray | None = slice_times - start
        start_seconds: float | None = start % 86400.0
    else:
        times_s = np.arange(n_frames, dtype=np.float64) * float(interval)  # type: ignore[arg-type]
        slice_times_s = None
        start_seconds = None

    first = instances[frames_of[0][0]]
    series_uids = tuple(dict.fromkeys(v.series_uid for v in volumes))
    return PerfusionVolume(
        geometry=reference,
        frames=frames,
        times_s=times_s.astype(np.float64),
        headers=[v.headers for v in volumes],
        series_uids=series_uids,
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        grouped_by=rule,
        slice_times_s=slice_times_s,
        start_seconds=start_seconds,
    )


# --- splitting into time points -------------------------------------------------------------


def _split_time_points(
    instances: list[Dataset], position: np.ndarray, rules: Sequence[str], where: str
) -> tuple[list[list[int]], str]:
    """Instance indices per time point (in time-point order) and the rule that split them."""
    per_position = Counter(position.tolist())
    n_frames = max(per_position.values())
    for rule in rules:
        groups = _groups(instances, position, rule, n_frames)
        if groups is None:
            continue
        if len(groups) == n_frames and all(len({int(position[i]) for i in g}) == len(g) for g in groups):
            return groups, rule
    counts = sorted(set(per_position.values()))
    raise InputError(
        f"{where}: cannot split the images into time points: slice positions hold {counts} images, "
        f"and none of {', '.join(rules)} separates them"
    )


def _groups(instances: list[Dataset], position: np.ndarray, rule: str, n_frames: int) -> list[list[int]] | None:
    """Groups of instance indices by ``rule``, ordered; None when the rule does not apply."""
    n = len(instances)
    if rule == _TIME:
        seconds = _instance_seconds(instances)
        if seconds is None:
            return None
        order = np.argsort(seconds, kind="stable")
        groups: list[list[int]] = [[int(order[0])]]
        for a, b in zip(order[:-1], order[1:], strict=True):
            if seconds[b] - seconds[a] > TIME_TOLERANCE_S:
                groups.append([])
            groups[-1].append(int(b))
        return groups
    if rule == _SERIES:
        by_series: dict[str, list[int]] = {}
        for i, ds in enumerate(instances):
            by_series.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append(i)
        if len(by_series) < 2:
            return None
        groups = list(by_series.values())
        seconds = _instance_seconds(instances)
        if seconds is not None:
            return sorted(groups, key=lambda g: float(np.mean(seconds[g])))
        numbers = [_number(instances[g[0]], "SeriesNumber") for g in groups]
        if any(v is None for v in numbers):
            return None
        return [groups[j] for j in np.argsort(np.asarray(numbers, dtype=float), kind="stable")]
    if rule == _REPEATS:
        # the t-th image at each position (in InstanceNumber order, else time order) is frame t
        keys = [_number(ds, "InstanceNumber") for ds in instances]
        if any(k is None for k in keys):
            seconds = _instance_seconds(instances)
            if seconds is None:
                return None
            keys = list(seconds)
        rank = np.zeros(n, dtype=int)
        for p in set(position.tolist()):
            members = sorted(np.flatnonzero(position == p), key=lambda i: (keys[i], i))
            for t, i in enumerate(members):
                rank[i] = t
        return [np.flatnonzero(rank == t).tolist() for t in range(n_frames)]
    values = [_number(ds, rule) for ds in instances]
    if any(v is None for v in values):
        return None
    by_value: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        by_value.setdefault(v, []).append(i)  # type: ignore[arg-type]
    return [by_value[v] for v in sorted(by_value)]


def _position_indices(instances: list[Dataset], where: str) -> np.ndarray:
    """Index of each instance's slice position along the normal (0 = lowest), shape (n,)."""
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
        lacking = sum(1 for ds in instances if ds.get(keyword) in (None, ""))
        if lacking:
            raise InputError(f"{where}: no {keyword} in {lacking} of {len(instances)} instances")
    try:
        iop = np.asarray(instances[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        along = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) @ normal for ds in instances])
    except (ValueError, TypeError) as error:
        raise InputError(f"{where}: unreadable ImagePositionPatient or ImageOrientationPatient: {error}") from error
    order = np.argsort(along, kind="stable")
    index = np.empty(len(instances), dtype=int)
    current = 0
    for rank, i in enumerate(order):
        if rank and along[i] - along[order[rank - 1]] > POSITION_TOLERANCE_MM:
            current += 1
        index[i] = current
    return index


def _check_split_slab(instances: list[Dataset], position: np.ndarray, where: str) -> None:
    """Refuse several series that cover different slice positions (a slab split in two)."""
    by_series: dict[str, set[int]] = {}
    for ds, p in zip(instances, position.tolist(), strict=True):
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "?")), set()).add(p)
    if len(by_series) < 2:
        return
    uids = list(by_series)
    for a_index, a in enumerate(uids):
        for b in uids[a_index + 1 :]:
            only_a, only_b = by_series[a] - by_series[b], by_series[b] - by_series[a]
            if only_a and only_b:
                described = "; ".join(
                    f"series {u} slices {min(by_series[u]) + 1}-{max(by_series[u]) + 1}" for u in (a, b)
                )
                raise InputError(
                    f"{where}: the slab is split into {len(uids)} series covering different slice "
                    f"positions ({described} of {int(position.max()) + 1}); loading a split slab "
                    "(two detector halves or a toggling table) is not supported: send one series "
                    "per time point or one series for the whole acquisition"
                )
    _check_repeated_acquisition(instances, position, where)


def _check_repeated_acquisition(instances: list[Dataset], position: np.ndarray, where: str) -> None:
    """Refuse several series holding the same slice positions at the same times (or, without
    times, several series that are each dynamic): two reconstructions of one scan."""
    members: dict[str, list[int]] = {}
    for i, ds in enumerate(instances):
        members.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append(i)
    if len(members) < 2:
        return
    seconds = _instance_seconds(instances)
    seen: dict[tuple[int, int], str] = {}
    dynamic = []
    for series_uid, indices in members.items():
        if seconds is None:
            if len(set(position[indices].tolist())) < len(indices):
                dynamic.append(series_uid)
            continue
        for i in indices:
            key = (int(position[i]), int(round(seconds[i] / TIME_TOLERANCE_S)))
            other = seen.setdefault(key, series_uid)
            if other != series_uid:
                raise InputError(
                    f"{where}: series {other} and {series_uid} both hold slice {key[0] + 1} at "
                    f"{instances[i].get('AcquisitionTime') or instances[i].get('ContentTime')}: two "
                    "reconstructions of one scan (kernels, slice thicknesses) or a resend? Pass one"
                )
    if len(dynamic) > 1:
        raise InputError(
            f"{where}: {len(dynamic)} series each hold several time points ({', '.join(dynamic[:3])}): "
            "two reconstructions of one scan or a resend? Pass one"
        )


# --- times ----------------------------------------------------------------------------------


def _instance_seconds(instances: Sequence[Dataset]) -> np.ndarray | None:
    """Each instance's acquisition (else content) time in seconds, None unless all have one.

    With a date on every instance the times are absolute (midnight crossings are exact);
    without, a jump back of more than 12 hours counts as crossing midnight.
    """
    seconds = [acquisition_seconds(ds) for ds in instances]
    if any(s is None for s in seconds):
        return None
    days = [_day(ds) for ds in instances]
    out = np.asarray(seconds, dtype=np.float64)
    if all(d is not None for d in days):
        out = out + 86400.0 * (np.asarray(days, dtype=np.float64) - float(min(days)))  # type: ignore[type-var]
    elif out.max() - out.min() > 43200.0:
        out[out < out.min() + 43200.0] += 86400.0
    return out


def _day(ds: Dataset) -> int | None:
    keyword = "AcquisitionDate" if str(ds.get("AcquisitionTime") or "").strip() else "ContentDate"
    text = str(ds.get(keyword) or "").strip()
    try:
        return date(int(text[0:4]), int(text[4:6]), int(text[6:8])).toordinal() if len(text) >= 8 else None
    except ValueError:
        return None


def _frame_label(instances: list[Dataset], group: list[int], rule: str, t: int, n_frames: int) -> str:
    label = f"time point {t + 1} of {n_frames}"
    first = instances[group[0]]
    if rule in ("AcquisitionNumber", "TemporalPositionIdentifier"):
        label += f" ({rule} {first.get(rule)})"
    elif rule == _SERIES:
        label += f" (series {first.get('SeriesInstanceUID', '?')})"
    time = str(first.get("AcquisitionTime") or first.get("ContentTime") or "").strip()
    if time:
        label += f" at {time}"
    return label


# --- vendor maps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MapRules:
    """Case-insensitive regular expressions recognising each perfusion map, searched first in
    ImageType value 4, then in SeriesDescription. A series matching several maps is not recognised."""

    cbf: str = r"\br?CBF\b|blood[ _-]?flow"
    cbv: str = r"\br?CBV\b|\bCBV[ _-]?map|blood[ _-]?volume"
    mtt: str = r"\bMTT\b|mean[ _-]?transit"
    ttp: str = r"\bTTP\b|time[ _-]?to[ _-]?peak"
    tmax: str = r"\bT[ _-]?MAX\b"

    def names(self) -> tuple[str, ...]:
        return ("cbf", "cbv", "mtt", "ttp", "tmax")

    def recognise(self, ds: Dataset) -> str | None:
        """The map a series is (its first instance ``ds``), or None."""
        image_type = list(ds.get("ImageType") or [])
        texts = [str(image_type[3]) if len(image_type) > 3 else "", str(ds.get("SeriesDescription") or "")]
        for text in texts:
            if not text:
                continue
            found = [n for n in self.names() if re.search(getattr(self, n), text, flags=re.IGNORECASE)]
            if len(found) == 1:
                return found[0]
        return None


DEFAULT_MAP_RULES = MapRules()


def load_vendor_maps(
    series: Mapping[str, Iterable[Source]] | Iterable[Source], rules: MapRules = DEFAULT_MAP_RULES
) -> dict[str, Volume]:
    """Vendor perfusion maps: {"cbf" | "cbv" | "mtt" | "ttp" | "tmax": 3D Volume}.

    ``series`` is a mapping whose values are a series' (or several series') instances, e.g.
    ``group_series`` output or instances by kind, or a flat list of Datasets or paths; the keys
    are not used. Each series is recognised by ``rules``; unrecognised and colour (RGB) series
    are left out. Values are in the vendor's real units (rescale applied; the units are in the
    headers, e.g. ImageComments). All maps must be on one grid. Raises InputError when no map
    is recognised, a map comes twice, or the grids differ.
    """
    instances = _flatten(series)
    by_uid: dict[str, list[Dataset]] = {}
    for ds in instances:
        by_uid.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append(ds)
    found: dict[str, list[Dataset]] = {}
    for uid, members in by_uid.items():
        name = rules.recognise(members[0])
        if name is None or int(members[0].get("SamplesPerPixel") or 1) != 1:
            continue
        if name in found:
            raise InputError(
                f"two series are recognised as {name.upper()} ({found[name][0].SeriesInstanceUID} and {uid}); "
                "pass one"
            )
        found[name] = members
    if not found:
        descriptions = sorted({str(m[0].get("SeriesDescription") or "?") for m in by_uid.values()})
        raise InputError(f"no perfusion map (CBF, CBV, MTT, TTP, Tmax) recognised among series {descriptions}")
    maps = {name: load_volume(found[name]) for name in rules.names() if name in found}
    reference = next(iter(maps))
    for name, volume in maps.items():
        difference = _grid_difference(volume.geometry, maps[reference].geometry)
        if difference:
            raise InputError(
                f"perfusion maps on different grids: {name.upper()} and {reference.upper()} differ in {difference}"
            )
    return maps


# --- internals ------------------------------------------------------------------------------


def _flatten(datasets: Iterable[Source] | Mapping[str, Iterable[Source]]) -> list[Dataset]:
    if isinstance(datasets, Mapping):
        sources: list[Source] = [s for group in datasets.values() for s in group]
    else:
        sources = list(datasets)
    instances = read_datasets(sources)
    if not instances:
        raise InputError("no instances to load")
    return instances


def _where(instances: Sequence[Dataset]) -> str:
    uids = list(dict.fromkeys(str(ds.get("SeriesInstanceUID", "?")) for ds in instances))
    return f"series {uids[0]}" if len(uids) == 1 else f"{len(uids)} series ({uids[0]}, ...)"


def _require_modality(instances: list[Dataset], modality: str, what: str) -> None:
    found = Counter(str(ds.get("Modality", "")) or "none" for ds in instances)
    if set(found) != {modality}:
        raise InputError(f"{_where(instances)}: {what} needs {modality} images, got modality {dict(found)}")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in instances}
    if len(studies) > 1:
        raise InputError(f"{_where(instances)}: images from {len(studies)} different studies mixed")


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _single_value(
    instances: list[Dataset], keyword: str, what: str, *, required_everywhere: bool = True
) -> float | None:
    """The one value of ``keyword`` (ms) shared by the instances; None when absent."""
    values = [_number(ds, keyword) for ds in instances]
    present = sorted({round(v, 3) for v in values if v is not None})
    if not present:
        return None
    lacking = sum(1 for v in values if v is None)
    if lacking and required_everywhere:
        raise InputError(f"{_where(instances)}: {what}: no {keyword} in {lacking} of {len(instances)} instances")
    if len(present) > 1:
        shown = ", ".join(f"{v:g}" for v in present[:6])
        raise InputError(
            f"{_where(instances)}: {what}: {len(present)} different {keyword} values ({shown} ms); "
            "multi-echo or mixed acquisitions are not supported: pass one echo"
        )
    return present[0]


def _grid_difference(a: Geometry, b: Geometry) -> str:
    """What differs between two grids ("" when they are the same within the tolerances)."""
    if a.shape != b.shape:
        return f"shape ({a.shape} vs {b.shape})"
    checks: tuple[tuple[str, Callable[[Geometry], tuple[float, ...]], float], ...] = (
        ("pixel spacing", lambda g: g.spacing[1:], GRID_TOLERANCE_MM),
        ("slice spacing", lambda g: g.spacing[:1], GRID_TOLERANCE_MM),
        ("orientation", lambda g: (*g.row_direction, *g.column_direction), 1e-4),
        ("origin", lambda g: g.origin, GRID_TOLERANCE_MM),
    )
    for name, value, tolerance in checks:
        va, vb = value(a), value(b)
        if not np.allclose(va, vb, atol=tolerance):
            return f"{name} ({tuple(round(float(x), 4) for x in va)} vs {tuple(round(float(x), 4) for x in vb)})"
    return ""
