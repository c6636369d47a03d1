"""When a series' own headers say it is whole, so its study is analysed without waiting for the
idle time.

A sender rarely says "that was the last image". Headers often say how many there will be:
- NumberOfSeriesRelatedInstances: the series' total;
- NumberOfTemporalPositions (T): the time points of a dynamic series, each a volume of the same
  slice positions; the series is whole when each of its S positions holds T images. S is known from
  ImagesInAcquisition when that counts one volume (S) or the whole series (S x T), else from
  the repeated slice positions: in a series sent volume after volume, the first position to come
  again closes the first volume;
- ImagesInAcquisition alone: the total of a series whose positions repeat (several images per
  position, e.g. b-values), every position holding the same count.
Every rule asks for the count to be reached exactly: a header that lies (fewer than arrive) stops
completing its series the moment one more image arrives, which then waits for the idle time; the
images are kept either way (see ``Tracker``). A series sent slice after slice (all of one position
first) gives no early answer, and neither does a single volume with nothing but ImagesInAcquisition
(which may count one acquisition of many): both complete on the idle time.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class CompletionRule(str, enum.Enum):
    """What said a series (or study) was whole."""

    SERIES_RELATED_INSTANCES = "NumberOfSeriesRelatedInstances"
    TEMPORAL_POSITIONS = "NumberOfTemporalPositions"
    IMAGES_IN_ACQUISITION = "ImagesInAcquisition"
    IDLE = "series_idle_s"


@dataclass(frozen=True)
class SeriesCounts:
    """What has been recorded of one series, and what its headers declare."""

    received: int
    declared_total: int | None = None  # NumberOfSeriesRelatedInstances
    temporal_positions: int | None = None  # NumberOfTemporalPositions
    images_in_acquisition: int | None = None  # ImagesInAcquisition
    per_position: dict[str, int] = field(default_factory=dict)  # images at each usable slice position
    unpositioned: int = 0  # images without a usable slice position

    @property
    def has_hint(self) -> bool:
        return any((self.declared_total, self.temporal_positions, self.images_in_acquisition))


def slices_before_first_repeat(positions_in_arrival_order: Sequence[str | None]) -> int | None:
    """How many distinct slice positions came before the first one came again (None: none has yet,
    or a position is unusable): the slices of one volume in a series sent volume after volume."""
    seen: set[str] = set()
    for position in positions_in_arrival_order:
        if position is None:
            return None
        if position in seen:
            return len(seen)
        seen.add(position)
    return None


def complete_by_headers(counts: SeriesCounts, first_volume_slices: int | None = None) -> CompletionRule | None:
    """The rule by which the series is whole now, or None (not yet, or its headers cannot tell).
    ``first_volume_slices``: ``slices_before_first_repeat`` of its images, needed only when it has
    NumberOfTemporalPositions without ImagesInAcquisition."""
    if counts.declared_total and counts.received == counts.declared_total:
        return CompletionRule.SERIES_RELATED_INSTANCES
    slices = len(counts.per_position)
    if slices < 2 or counts.unpositioned or counts.received != sum(counts.per_position.values()):
        return None
    per_slice = set(counts.per_position.values())
    if len(per_slice) != 1:
        return None  # not a grid (yet): some position has more images than another
    (each,) = per_slice
    time_points, in_acquisition = counts.temporal_positions, counts.images_in_acquisition
    if time_points:
        if each != time_points:
            return None
        if in_acquisition:
            return CompletionRule.TEMPORAL_POSITIONS if in_acquisition in (slices, slices * time_points) else None
        return CompletionRule.TEMPORAL_POSITIONS if first_volume_slices == slices else None
    if in_acquisition and each >= 2 and counts.received == in_acquisition:
        return CompletionRule.IMAGES_IN_ACQUISITION
    return None


def needs_arrival_order(counts: SeriesCounts) -> bool:
    """Whether ``complete_by_headers`` needs ``first_volume_slices`` for this series (reading the
    arrival order costs a query: only asked when the counts already form a grid of T per position)."""
    values = set(counts.per_position.values())
    return bool(counts.temporal_positions and not counts.images_in_acquisition and not counts.unpositioned
                and len(counts.per_position) >= 2 and values == {counts.temporal_positions})
