"""A real PACS in the loop: Orthanc with the shipped routing rule forwards a stroke study to
StrokeGate by itself, and StrokeGate's results land in the same Orthanc study, once."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from dicom_tools import (
    ORTHANC_CONFIG,
    dciodvfy_errors,
    load_orthanc_config,
    requires_dciodvfy,
    requires_orthanc,
    requires_storescu,
    run_orthanc,
    storescu,
)
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import Service, wait_for

pytestmark = [pytest.mark.integration, requires_orthanc, requires_storescu, requires_dciodvfy, pytest.mark.timeout(300)]

ROUTING = ORTHANC_CONFIG.parent / "strokegate.json"


def test_orthanc_forwards_the_study_and_gets_seg_and_sr_back_into_it(tmp_path: Path) -> None:
    write_patient(2, "mri", tmp_path / "patient", PhantomOptions(mr_matrix=96, mr_frames=4))
    dwi = tmp_path / "patient" / "SGPH00000002" / "dicom" / "MR" / "dwi"
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'db.sqlite'}", [])
    routing = load_orthanc_config(ROUTING)
    routing["DicomModalities"]["strokegate"] = ["STROKEGATE", "127.0.0.1", service.port]
    routing["LuaScripts"] = [str(ORTHANC_CONFIG.parent / "strokegate.lua")]
    routing["StableAge"] = 2
    with run_orthanc(tmp_path / "orthanc", overrides=routing) as orthanc:
        service.destinations = [f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"]
        service.start()
        try:
            storescu(dwi, orthanc.dicom_port, orthanc.aet)

            def modalities() -> list[str]:
                studies = orthanc.get("/studies")
                assert len(studies) == 1, "results must file into the source study"
                return sorted(s["MainDicomTags"]["Modality"] for s in orthanc.get(f"/studies/{studies[0]}/series"))

            wait_for(lambda: modalities() == ["MR", "SEG", "SR"], 180, "SEG and SR in the Orthanc study")
            time.sleep(4)  # the study is stable again: a second forward would happen now
            assert "forwarded 1 series" in orthanc.log_text()
            assert orthanc.log_text().count("StrokeGate: forwarded") == 1, "the results were not sent back"
            jobs = service.get("/api/jobs")
            assert [(j["version"], j["state"]) for j in jobs] == [(1, "done")]
            for series in orthanc.get(f"/studies/{orthanc.get('/studies')[0]}/series"):
                if series["MainDicomTags"]["Modality"] in ("SEG", "SR"):
                    instance = series["Instances"][0]
                    path = tmp_path / f"{instance}.dcm"
                    with urllib.request.urlopen(f"{orthanc.rest_url}/instances/{instance}/file", timeout=10) as response:
                        path.write_bytes(response.read())
                    assert dciodvfy_errors(path) == [], series["MainDicomTags"]["Modality"]
        finally:
            service.stop()
