"""The SR names the NIHSS it used, or says there was none; a later NIHSS gives a new version of the
report in the same series with the imaging measurements untouched."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import pydicom
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


def test_the_reviser_issues_a_revision_only_when_the_nihss_to_use_changes(
    reports: tuple[Dataset, Dataset], tmp_path: Path,
) -> None:
    from datetime import timedelta

    from sqlalchemy import select

    from service.analysis.clinical_revision import ClinicalReviser, StaleOutcome
    from service.clinical.nihss import NihssReport, record_nihss
    from service.store.database import Database
    from service.store.models import ClinicalResult, Delivery, Job, JobState, ResultObject, Study, utcnow

    first = reports[0]  # written without an NIHSS
    results = tmp_path / "results"
    (results / "s" / "v1").mkdir(parents=True)
    first.save_as(results / "s" / "v1" / "SR.dcm", enforce_file_format=True)
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.upgrade()
    analysed = utcnow() - timedelta(minutes=1)
    with db.session() as session:
        study = Study(study_uid=first.StudyInstanceUID, patient_id="P1", versions=1)
        job = Job(study=study, version=1, state=JobState.DONE, last_instance_at=analysed, started_at=analysed,
                  finished_at=analysed, findings={"version": 1})
        sr = ResultObject(job=job, kind="SR", sop_uid=first.SOPInstanceUID, sop_class_uid=first.SOPClassUID,
                          path="s/v1/SR.dcm")
        session.add_all([study, job, sr])
        session.flush()
        session.add(ClinicalResult(job_id=job.id, revision=1, nihss_id=None, result_id=sr.id))
    stale: list[StaleOutcome] = []
    reviser = ClinicalReviser(db, results, {"PACS@h:104": frozenset({"sr", "seg"})}, on_outcome_stale=stale.append)
    assert reviser.check() == 0  # nothing received: the report stays as it is

    def receive(value: int, minutes: int, source_id: str) -> None:
        record_nihss(db, NihssReport("P1", None, value, analysed + timedelta(minutes=minutes), NihssSource.HL7, source_id))

    receive(30, 5, "after")  # assessed after the analysis: kept, not used
    assert reviser.check() == 0
    receive(14, -30, "late")  # documented late, assessed before: a new version
    assert reviser.check() == 1 and reviser.check() == 0
    (outcome,) = stale
    assert (outcome.revision, outcome.nihss.value, outcome.report.path) == (2, 14, "s/v1/SR-r2.dcm")
    second = pydicom.dcmread(results / "s" / "v1" / "SR-r2.dcm")
    assert clinical_input(second)["72089-6"] == (14.0, "{score}") and second.InstanceNumber == 2
    with db.session() as session:
        revisions = session.scalars(select(ClinicalResult).order_by(ClinicalResult.revision)).all()
        assert [(r.revision, r.nihss_id is None) for r in revisions] == [(1, True), (2, False)]
        pending = session.scalars(select(Delivery)).all()
        assert [d.result.sop_uid for d in pending] == [second.SOPInstanceUID]  # the new report alone
        assert session.scalar(select(Job)).findings["nihss"]["value"] == 14
    db.dispose()
