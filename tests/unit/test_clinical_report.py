"""The SR names the NIHSS it used, or says there was none; a later NIHSS gives a new version of the
report in the same series with the imaging measurements untouched."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from service.findings import NIHSS_NOT_AVAILABLE, NihssSource, NihssUsed
from service.results.seg import build_seg
from service.results.sr import build_sr, clinical_input, revise_sr
from test_results import make_findings, patient, write_and_read  # noqa: F401 - the fixture too

HL7_14 = NihssUsed(14, NihssSource.HL7, "MSG0001", datetime(2026, 12, 4, 10, 15), datetime(2026, 12, 4, 10, 20), 1)
HL7_22 = NihssUsed(22, NihssSource.HL7, "MSG0002", datetime(2026, 12, 4, 10, 16), datetime(2026, 12, 4, 11, 0), 2)


def _walk(items):  # noqa: ANN001, ANN202
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def imaging_numbers(sr: Dataset) -> list[float]:
    return [float(i.MeasuredValueSequence[0].NumericValue) for i in _walk(sr.ContentSequence)
            if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue != "72089-6"]


@pytest.fixture(scope="module")
def reports(patient: Path) -> tuple[Dataset, Dataset]:  # noqa: F811
    without = make_findings(patient)
    with_nihss = dataclasses.replace(without, nihss=HL7_14)
    seg = build_seg(without)
    return write_and_read(build_sr(without, seg)), write_and_read(build_sr(with_nihss, seg))


def test_the_sr_names_the_nihss_used_with_its_source_and_time(reports: tuple[Dataset, Dataset]) -> None:
    items = clinical_input(reports[1])
    assert items["72089-6"] == (14.0, "{score}")
    assert items["CLINICALINPUT"] == "NIHSS 14 (HL7 v2 ORU^R01, assessed 2026-12-04 10:15 UTC)"
    assert items["NIHSSSOURCE"] == "HL7 v2 ORU^R01, id MSG0001"
    assert str(items["NIHSSASSESSED"]).startswith("20261204101500")


def test_without_nihss_the_sr_says_imaging_only(reports: tuple[Dataset, Dataset]) -> None:
    assert clinical_input(reports[0]) == {"CLINICALINPUT": NIHSS_NOT_AVAILABLE}


def test_a_revision_is_a_new_instance_of_the_same_series_naming_the_new_nihss(reports: tuple[Dataset, Dataset]) -> None:
    first = reports[1]
    second = write_and_read(revise_sr(first, first.StudyInstanceUID, 1, 2, HL7_22))
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.file_meta.MediaStorageSOPInstanceUID == second.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID and second.InstanceNumber == 2
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert clinical_input(second)["72089-6"] == (22.0, "{score}")
    assert imaging_numbers(second) == imaging_numbers(first) != []
    third = revise_sr(second, first.StudyInstanceUID, 1, 3, None)
    assert clinical_input(third) == {"CLINICALINPUT": NIHSS_NOT_AVAILABLE} and third.InstanceNumber == 3
    assert len({first.SOPInstanceUID, second.SOPInstanceUID, third.SOPInstanceUID}) == 3
