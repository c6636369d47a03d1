"""Bad input never crashes the service, never disturbs other studies, and is reported with a reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import CTImageStorage, UltrasoundImageStorage
from pynetdicom import AE

from dicom_tools import requires_storescu, storescu
from service.phantom.dicom_writer import uid
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import Service, StoreSCP, wait_for

pytestmark = [pytest.mark.integration, requires_storescu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def dwi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad")
    write_patient(2, "mri", out, PhantomOptions(mr_matrix=96, mr_frames=4))
    return out / "SGPH00000002" / "dicom" / "MR" / "dwi"


def variant(dwi: Path, folder: Path, name: str, change=None, keep=None) -> str:  # noqa: ANN001
    """Copy the DWI series as a new study (new UIDs), applying ``change(ds, index)``; returns its UID."""
    folder.mkdir(parents=True)
    study = uid("test-variant", name)
    for index, path in enumerate(sorted(dwi.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        if keep is not None and not keep(ds):
            continue
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = uid("test-variant", name, "series")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("test-variant", name, index)
        if change is not None:
            change(ds, index)
        ds.save_as(folder / path.name, enforce_file_format=True)
    return study


def test_bad_studies_fail_with_reasons_and_good_ones_still_succeed(tmp_path: Path, dwi: Path) -> None:
    """Each fails with its reason at the first attempt (no "internal error after 3 attempts"),
    among them the cases of issue 11: Rows with VR UI, a single slice, an MR image sent as CT."""
    pacs = StoreSCP(tmp_path / "pacs").start()
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [f"{pacs.address}?send=seg+sr"]).start()
    try:
        def no_pixels(ds, index):  # noqa: ANN001, ANN202
            del ds.PixelData

        def inconsistent(ds, index):  # noqa: ANN001, ANN202
            if index % 2:
                ds.PixelSpacing = [2.5, 2.5]

        def truncated(ds, index):  # noqa: ANN001, ANN202
            if index == 3:
                ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

        def rows_as_uid(ds, index):  # noqa: ANN001, ANN202 - crashed the analysis three times before
            ds[0x00280010] = DataElement(0x00280010, "UI", "1.2.840")

        def mr_as_ct(ds, index):  # noqa: ANN001, ANN202 - an MR image sent as CT Image Storage
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage

        middle = sorted(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in dwi.glob("*.dcm"))
        middle = middle[len(middle) // 2]

        studies = {
            "rows_ui": (variant(dwi, tmp_path / "rows_ui", "rows_ui", rows_as_uid), "rows of"),
            "one_slice": (variant(dwi, tmp_path / "one_slice", "one_slice",
                                  keep=lambda ds: abs(float(ds.ImagePositionPatient[2]) - middle) < 0.01), "1 slice"),
            "mr_as_ct": (variant(dwi, tmp_path / "mr_as_ct", "mr_as_ct", mr_as_ct), "modality mr does not match"),
            "no_pixels": (variant(dwi, tmp_path / "no_pixels", "no_pixels", no_pixels), "no pixel data"),
            "geometry": (variant(dwi, tmp_path / "geometry", "geometry", inconsistent), "inconsistent"),
            "one_b": (variant(dwi, tmp_path / "one_b", "one_b", keep=lambda ds: float(ds.DiffusionBValue) > 0), "b-value"),
            "truncated": (variant(dwi, tmp_path / "truncated", "truncated", truncated), "pixel data"),
        }
        good = variant(dwi, tmp_path / "good", "good")
        for name in studies:
            storescu(tmp_path / name, service.port, "STROKEGATE")
        storescu(tmp_path / "good", service.port, "STROKEGATE")

        def settled() -> bool:
            states = [service.get(f"/api/studies/{u}", {}).get("state") for u, _ in studies.values()]
            return all(s == "failed" for s in states) and service.get(f"/api/studies/{good}", {}).get("state") == "done"

        wait_for(settled, 120, "bad studies failed and the good one done")
        for name, (study, reason) in studies.items():
            error = service.get(f"/api/studies/{study}")["error"]
            assert reason in error.lower(), f"{name}: {error}"
        assert service.metric("strokegate_jobs_failed_total", error="input") == 7
        assert service.metric("strokegate_jobs_failed_total", error="internal") == 0
        wait_for(lambda: len(pacs.files()) == 2, 60, "the good study's SEG and SR")
    finally:
        service.stop()
        pacs.stop()


def store_statuses(port: int, like: pydicom.Dataset, objects: list) -> list[int]:  # noqa: ANN001
    """C-STORE each object (Dataset or file path) over one pynetdicom association; their statuses."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(like.SOPClassUID, like.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="STROKEGATE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(o).Status) for o in objects]
    finally:
        assoc.release()


def test_unfileable_instances_are_refused_or_quarantined_and_the_association_goes_on(tmp_path: Path, dwi: Path) -> None:
    """A bad SOP Instance UID in the request is refused at once (0xC210); a header that turns out
    unfileable after the instance was made durable and acknowledged is quarantined with a metric."""
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", []).start()
    try:
        good = pydicom.dcmread(sorted(dwi.glob("*.dcm"))[0])
        broken = pydicom.Dataset()
        broken.file_meta = good.file_meta
        broken.SOPClassUID = good.SOPClassUID
        broken.SOPInstanceUID = "1.2.3.4"
        broken.StudyInstanceUID = "not a UID/../../etc"
        broken.SeriesInstanceUID = "1.2.3"
        garbage = tmp_path / "garbage.dcm"
        broken.save_as(garbage, enforce_file_format=True)
        bad_uid = pydicom.dcmread(sorted(dwi.glob("*.dcm"))[1])
        bad_uid.SOPInstanceUID = "1.2.3.x"
        assert store_statuses(service.port, good, [garbage, bad_uid, good]) == [0x0000, 0xC210, 0x0000]
        assert service.metric("strokegate_instances_rejected_total", reason="invalid") == 1
        wait_for(lambda: service.metric("strokegate_instances_quarantined_total", reason="invalid") == 1, 10,
                 "the unfileable instance quarantined")
        assert (tmp_path / "gate" / "spool" / "quarantine" / "1.2.3.4.dcm").exists()
        assert "StudyInstanceUID" in (tmp_path / "gate" / "spool" / "quarantine" / "1.2.3.4.reason").read_text()
        assert not list((tmp_path / "gate" / "spool").glob("not*"))
        assert service.get("/healthz")["status"] == "ok"
    finally:
        service.stop()


def test_unsupported_sop_class_is_refused_at_negotiation(tmp_path: Path, dwi: Path) -> None:
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", []).start()
    try:
        ds = pydicom.dcmread(sorted(dwi.glob("*.dcm"))[0])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
        ds.Modality = "US"
        path = tmp_path / "us.dcm"
        ds.save_as(path, enforce_file_format=True)
        result = subprocess.run(
            ["storescu", "-aec", "STROKEGATE", "127.0.0.1", str(service.port), str(path)],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode != 0
        assert "presentation context" in (result.stdout + result.stderr).lower()
        storescu(dwi, service.port, "STROKEGATE")  # the service carries on
        count = len(list(dwi.glob("*.dcm")))
        wait_for(lambda: service.metric("strokegate_instances_received_total", modality="MR") == count, 30,
                 "every MR instance filed")
    finally:
        service.stop()


def test_unknown_calling_ae_is_rejected_with_a_logged_reason(tmp_path: Path, dwi: Path) -> None:
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [],
                      env={"STROKEGATE_ALLOWED_CALLING_AETS": '["TRUSTED"]'}).start()
    try:
        with pytest.raises(AssertionError, match="Association Rejected"):
            storescu(dwi, service.port, "STROKEGATE", calling_aet="STRANGER")
        storescu(dwi, service.port, "STROKEGATE", calling_aet="TRUSTED")
        assert service.metric("strokegate_associations_total", result="rejected") == 1
        assert "rejected association" in service.log.read_text()
    finally:
        service.stop()


def test_disk_below_the_watermark_refuses_instances_with_out_of_resources(tmp_path: Path, dwi: Path) -> None:
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [],
                      env={"STROKEGATE_MIN_FREE_BYTES": str(10**18)}).start(ready=False)
    try:
        assert service.get("/readyz", missing=None, status=503)["status"] == "not ready"
        ds = pydicom.dcmread(sorted(dwi.glob("*.dcm"))[0])
        assert store_statuses(service.port, ds, [ds]) == [0xA700]
        assert service.metric("strokegate_instances_rejected_total", reason="disk_full") == 1
        assert not list((tmp_path / "gate" / "spool").rglob("*.dcm"))
    finally:
        service.stop()
