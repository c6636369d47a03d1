"""A study is analysed as soon as its headers say it is whole, never before, and nothing that
arrives after a lying header is lost."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset

from service.ingest.completion import (
    CompletionRule,
    SeriesCounts,
    complete_by_headers,
    needs_arrival_order,
    slices_before_first_repeat,
)
from service.ingest.header import ReceivedInstance, received_instance
from service.ingest.spool import Spool
from service.ingest.tracker import Tracker, record_instances
from service.store.database import Database
from service.store.models import Instance, Job, Study, StudyState, utcnow

SLICES, TIMES = 6, 5


def first_complete(order: list[tuple[int, int]], **declared: int) -> int | None:
    """Feed a series' images (time point, slice) one by one; the number received when the headers
    first said it was whole (None: never)."""
    per_position: dict[str, int] = {}
    arrived: list[str] = []
    for received, (_, k) in enumerate(order, start=1):
        position = f"0.00\\0.00\\{5.0 * k:.2f}"
        per_position[position] = per_position.get(position, 0) + 1
        arrived.append(position)
        counts = SeriesCounts(received=received, per_position=dict(per_position), **declared)
        first_volume = slices_before_first_repeat(arrived) if needs_arrival_order(counts) else None
        if complete_by_headers(counts, first_volume) is not None:
            return received
    return None


TIME_MAJOR = [(t, k) for t in range(TIMES) for k in range(SLICES)]
SLICE_MAJOR = [(t, k) for k in range(SLICES) for t in range(TIMES)]


def test_time_points_times_repeated_positions_complete_a_perfusion_series_at_its_last_image() -> None:
    assert first_complete(TIME_MAJOR, temporal_positions=TIMES) == SLICES * TIMES


def test_a_series_sent_slice_after_slice_waits_for_the_idle_time_unless_its_size_is_declared() -> None:
    """All time points of the first slice look like a whole series of one slice: without a
    count of slices it must not complete early."""
    assert first_complete(SLICE_MAJOR, temporal_positions=TIMES) is None
    assert first_complete(SLICE_MAJOR, temporal_positions=TIMES, images_in_acquisition=SLICES) == SLICES * TIMES
    assert first_complete(SLICE_MAJOR, temporal_positions=TIMES, images_in_acquisition=SLICES * TIMES) == SLICES * TIMES


@pytest.mark.parametrize("seed", range(5))
def test_declared_counts_complete_at_the_last_image_in_any_order(seed: int) -> None:
    shuffled = random.Random(seed).sample(TIME_MAJOR, len(TIME_MAJOR))
    assert first_complete(shuffled, temporal_positions=TIMES, images_in_acquisition=SLICES) == SLICES * TIMES
    assert first_complete(shuffled, declared_total=SLICES * TIMES) == SLICES * TIMES


def test_images_in_acquisition_alone_completes_a_series_whose_positions_repeat() -> None:
    """E.g. DWI with two b-values: two images per position, the acquisition's total declared."""
    two_b_values = [(b, k) for b in range(2) for k in range(SLICES)]
    assert first_complete(two_b_values, images_in_acquisition=2 * SLICES) == 2 * SLICES
    # one volume per acquisition of a dynamic series: it counts a volume, not the series
    assert first_complete(TIME_MAJOR, images_in_acquisition=SLICES) is None


def test_a_series_without_counts_or_with_unusable_positions_waits_for_the_idle_time() -> None:
    assert first_complete(TIME_MAJOR) is None
    grid = {f"p{k}": TIMES for k in range(SLICES)}
    assert complete_by_headers(SeriesCounts(SLICES * TIMES, temporal_positions=TIMES, images_in_acquisition=SLICES,
                                            per_position=grid)) == CompletionRule.TEMPORAL_POSITIONS
    assert complete_by_headers(SeriesCounts(SLICES * TIMES + 1, temporal_positions=TIMES, images_in_acquisition=SLICES,
                                            per_position=grid, unpositioned=1)) is None


def test_a_header_that_claims_fewer_stops_counting_once_one_more_arrives() -> None:
    assert complete_by_headers(SeriesCounts(10, declared_total=10)) == CompletionRule.SERIES_RELATED_INSTANCES
    assert complete_by_headers(SeriesCounts(11, declared_total=10)) is None


def header(**values: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.1", "CT"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_completion_headers_are_read_and_unusable_ones_cost_the_instance_nothing() -> None:
    good = received_instance(header(NumberOfTemporalPositions=40, ImagesInAcquisition=12,
                                    ImagePositionPatient=[-120.0, -0.004, 37.5]), "a.dcm", 10, "CT1")
    assert (good.temporal_positions, good.images_in_acquisition) == (40, 12)
    assert good.slice_position == "-120.00\\0.00\\37.50"
    odd = received_instance(header(NumberOfTemporalPositions=0, ImagesInAcquisition=[3, 4],
                                   ImagePositionPatient=[1.0, 2.0]), "b.dcm", 10, "CT1")
    assert (odd.temporal_positions, odd.images_in_acquisition, odd.slice_position) == (None, None, None)
    huge = received_instance(header(ImagePositionPatient=[1.0, 2.0, 1e9]), "c.dcm", 10, "CT1")
    assert huge.slice_position is None


def ctp_instance(t: int, k: int, **declared: int) -> ReceivedInstance:
    sop = f"1.2.9.{t}.{k}"
    return ReceivedInstance("1.2.9", "1.2.9.1", sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                            f"1.2.9/1.2.9.1/{sop}.dcm", 100, "CT", "SGPH1", "ACC1", "CTP", None, "SCANNER",
                            slice_position=f"0.00\\0.00\\{5 * k:.2f}", **declared)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    database.upgrade()
    yield database
    database.dispose()


def test_the_tracker_queues_a_perfusion_study_at_its_last_image_not_after_the_idle_time(db: Database, tmp_path: Path) -> None:
    tracker = Tracker(db, Spool(tmp_path / "spool"), series_idle_s=600, retention_hours=24)
    t0 = utcnow()
    images = [ctp_instance(t, k, temporal_positions=TIMES) for t, k in TIME_MAJOR]
    for index, image in enumerate(images[:-1]):
        with db.session() as s:
            record_instances(s, [dataclasses.replace(image, received_at=t0 + timedelta(milliseconds=index))], t0)
        if index % SLICES == SLICES - 1:  # each whole volume is a grid too, but not yet TIMES deep
            assert tracker.tick(t0) == []
    with db.session() as s:
        record_instances(s, [images[-1]], t0 + timedelta(seconds=1))
    assert len(tracker.tick(t0 + timedelta(seconds=1))) == 1


def test_images_after_a_header_that_claimed_fewer_are_filed_and_analysed_in_the_next_version(
    db: Database, tmp_path: Path
) -> None:
    """The header says 4; 6 arrive. The first 4 make version 1 at once; the other 2 are recorded
    (nothing is lost), do not complete the study again by the disproved header, and after the idle
    time version 2 holds all 6."""
    tracker = Tracker(db, Spool(tmp_path / "spool"), series_idle_s=10, retention_hours=24)
    t0 = utcnow()
    liar = [dataclasses.replace(ctp_instance(0, k), expected_instances=4) for k in range(6)]
    with db.session() as s:
        record_instances(s, liar[:4], t0)
    assert len(tracker.tick(t0)) == 1
    with db.session() as s:
        assert record_instances(s, liar[4:], t0 + timedelta(seconds=1)) == 2
        assert s.query(Study).one().state == StudyState.RECEIVING
    assert tracker.tick(t0 + timedelta(seconds=2)) == []  # 6 of "4": the header no longer completes it
    assert len(tracker.tick(t0 + timedelta(seconds=12))) == 1  # the idle time does
    with db.session() as s:
        assert [j.version for j in s.query(Job).order_by(Job.id)] == [1, 2]
        assert s.query(Instance).count() == 6
