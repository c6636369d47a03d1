"""Proves the integration-test infrastructure works against the real tools."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_tools import (
    ORTHANC_CONFIG,
    OrthancServer,
    dciodvfy_errors,
    dciodvfy_warnings,
    free_port,
    load_orthanc_config,
    requires_dciodvfy,
    requires_orthanc,
    requires_storescu,
    run_orthanc,
    storescu,
    strip_json_comments,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def make_ct(path: Path, *, new_uids: bool = True, drop: tuple[str, ...] = ()) -> Path:
    """Write pydicom's CT_small.dcm to ``path``, optionally re-UIDed and minus keywords."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    if new_uids:
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in drop:
        delattr(ds, keyword)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def sop_instance_uids(orthanc: OrthancServer) -> set[str]:
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances?expand")}


# -- no external tool needed -------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_strip_json_comments_keeps_strings() -> None:
    text = '{"a": "http://x/*y*/", /* block */ "b": 1 // line\n}'
    assert strip_json_comments(text) == '{"a": "http://x/*y*/",  "b": 1 \n}'


def test_deploy_config_parses() -> None:
    config = load_orthanc_config(ORTHANC_CONFIG)
    assert config["DicomAet"] == "ORTHANC"
    assert (config["DicomPort"], config["HttpPort"]) == (4242, 8042)
    assert config["Plugins"] == []
    assert config["RemoteAccessAllowed"] is False
    assert config["UnknownSopClassAccepted"] is False
    routing = load_orthanc_config(ORTHANC_CONFIG.parent / "strokegate.json")
    assert not set(config) & set(routing), "Orthanc refuses a section defined in two files of its folder"
    assert routing["DicomModalities"]["strokegate"][0] == "STROKEGATE"


# -- Orthanc + storescu -------------------------------------------------------


def test_orthanc_fixture_uses_runtime_ports(orthanc: OrthancServer) -> None:
    system = orthanc.get("/system")
    assert system["DicomAet"] == orthanc.aet == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port != 4242
    assert orthanc.rest_url.endswith(f":{system['HttpPort']}")
    assert system["Name"] == "StrokeGate PACS"
    assert orthanc.get("/instances") == []
    assert orthanc.log_path.is_file()


@requires_orthanc
def test_run_orthanc_startup_failure_reports_log(tmp_path: Path) -> None:
    with socket.socket() as busy:  # Orthanc cannot bind its HTTP port: exits in ~2 s
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match="already in use") as info:
            with run_orthanc(tmp_path, overrides={"HttpPort": port}, attempts=1):
                pytest.fail("Orthanc started on a busy port")
    assert "Orthanc did not start" in str(info.value)


@requires_storescu
def test_storescu_file_reaches_orthanc(orthanc: OrthancServer, tmp_path: Path) -> None:
    src = dcmread(make_ct(tmp_path / "ct.dcm"))
    storescu(tmp_path / "ct.dcm", orthanc.dicom_port, orthanc.aet)

    (instance_id,) = orthanc.get("/instances")
    (study,) = orthanc.get("/studies?expand")
    assert study["MainDicomTags"]["StudyInstanceUID"] == src.StudyInstanceUID
    tags = orthanc.get(f"/instances/{instance_id}/simplified-tags")
    assert tags["SOPInstanceUID"] == src.SOPInstanceUID
    assert tags["Modality"] == "CT"


@requires_storescu
def test_storescu_directory_is_sent_recursively(
    orthanc_module: OrthancServer, tmp_path: Path
) -> None:
    files = [make_ct(tmp_path / "in" / sub / "x.dcm") for sub in ("a", "b/c")]
    storescu(tmp_path / "in", orthanc_module.dicom_port, orthanc_module.aet)
    expected = {dcmread(f).SOPInstanceUID for f in files}
    assert expected <= sop_instance_uids(orthanc_module)


@requires_storescu
def test_storescu_wrong_called_aet_fails(orthanc_module: OrthancServer, tmp_path: Path) -> None:
    path = make_ct(tmp_path / "ct.dcm")
    with pytest.raises(AssertionError, match="storescu exited"):
        storescu(path, orthanc_module.dicom_port, "NOT_ORTHANC")
    assert dcmread(path).SOPInstanceUID not in sop_instance_uids(orthanc_module)


# -- dciodvfy -----------------------------------------------------------------


@requires_dciodvfy
def test_dciodvfy_valid_ct_has_no_errors(tmp_path: Path) -> None:
    path = make_ct(tmp_path / "ct.dcm")
    assert dciodvfy_errors(path) == []
    # CT_small.dcm has PatientWeight 0 and an empty Laterality: warnings only.
    assert any("Weight" in w for w in dciodvfy_warnings(path))


@requires_dciodvfy
@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (("Modality",), "Modality"),  # reported as Type 1C in <GeneralSeries>
        (("SOPClassUID",), "SOPClassUID"),
        (("Rows",), "Rows"),
    ],
)
def test_dciodvfy_reports_missing_required_attribute(
    tmp_path: Path, drop: tuple[str, ...], expected: str
) -> None:
    errors = dciodvfy_errors(make_ct(tmp_path / "bad.dcm", drop=drop))
    assert errors, "dciodvfy reported no error"
    assert all(e.startswith(("Error", "Abort")) for e in errors)
    assert any(expected in e for e in errors), errors


@requires_dciodvfy
def test_dciodvfy_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        dciodvfy_errors(tmp_path / "absent.dcm")
