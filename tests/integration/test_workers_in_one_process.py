"""Several analysis workers in one process give the results one worker gives.

The same four synthetic MRI studies go to a `strokegate serve` with ``workers: 1`` and to one with
``workers: 4`` (all four analysed at once, each drawing its summary, colour maps and colour bars
on its own thread). Every result object must agree: the SEG's segments and voxels, the SR's
numbers, and the pixels of the summary and of every colour map image, exactly (the drawing is
deterministic, so any difference is one thread's figure leaking into another's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_tools import requires_storescu, storescu
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import Service, wait_for

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(600)]

SEEDS = (2, 3, 4, 5)


@pytest.fixture(scope="module")
def dwi_studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The DWI series of four synthetic MRI patients (different lesions, sides and sizes); their
    DSC series, not sent, short to make."""
    out = tmp_path_factory.mktemp("patients")
    folders = []
    for seed in SEEDS:
        write_patient(seed, "mri", out, PhantomOptions(mr_frames=8))
        folders.append(out / f"SGPH{seed:08d}" / "dicom" / "MR" / "dwi")
    return folders


def analyse_all(root: Path, workers: int, studies: list[Path]) -> dict[str, dict[str, pydicom.Dataset]]:
    """Send every study to a service with ``workers`` workers; its result objects by study and kind."""
    service = Service(root, f"sqlite:///{root / 'db.sqlite'}", [], env={"STROKEGATE_WORKERS": str(workers)})
    try:
        service.start()
        for folder in studies:
            storescu(folder, service.port, "STROKEGATE")

        def all_done() -> list[dict] | None:
            jobs = service.get("/api/jobs")
            failed = [j for j in jobs if j["state"] == "failed"]
            assert not failed, f"analysis failed: {failed}"
            return jobs if len(jobs) == len(studies) and all(j["state"] == "done" for j in jobs) else None

        jobs = wait_for(all_done, 400, f"{len(studies)} analyses with {workers} workers", interval=0.5)
        if workers > 1:  # the point of the test: analyses ran side by side
            spans = sorted((j["started_at"], j["finished_at"]) for j in jobs)
            assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    finally:
        service.stop()
    results: dict[str, dict[str, pydicom.Dataset]] = {}
    for folder in sorted((root / "results").iterdir()):
        results[folder.name] = {path.stem: pydicom.dcmread(path) for path in (folder / "v1").glob("*.dcm")}
    return results


def sr_numbers(sr: pydicom.Dataset) -> list[tuple[str, float]]:
    """Every numeric measurement of the SR content tree: (concept name, value), in document order."""
    found = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "NUM":
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                found.append((str(name), float(item.MeasuredValueSequence[0].NumericValue)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_four_workers_in_one_process_give_the_results_of_one(tmp_path: Path, dwi_studies: list[Path]) -> None:
    one = analyse_all(tmp_path / "one", 1, dwi_studies)
    four = analyse_all(tmp_path / "four", 4, dwi_studies)
    assert len(one) == len(SEEDS)
    assert one.keys() == four.keys()
    for study, objects in one.items():
        assert objects.keys() == four[study].keys(), study
        kinds = set(objects)
        assert {"SEG", "SR", "SUMMARY"} <= kinds, kinds
        assert any(kind.startswith("MAP-") for kind in kinds), kinds
        for kind, expected in objects.items():
            got = four[study][kind]
            assert got.SOPInstanceUID == expected.SOPInstanceUID, (study, kind)
            if kind == "SR":
                numbers = sr_numbers(expected)
                assert numbers, "the SR holds no measurements"
                assert sr_numbers(got) == numbers, study
            elif kind == "SEG":
                assert [s.SegmentLabel for s in got.SegmentSequence] == [s.SegmentLabel for s in expected.SegmentSequence]
                assert np.array_equal(got.pixel_array, expected.pixel_array), study
            else:  # summary, colour maps (drawn with matplotlib) and parametric maps
                assert np.array_equal(got.pixel_array, expected.pixel_array), (study, kind)
