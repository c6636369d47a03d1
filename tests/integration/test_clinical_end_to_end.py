"""End to end: the NIHSS by HL7 v2 (the `hl7` package's MLLP client), FHIR R4 (a real FHIR server
of fhir.resources models) and REST, an MRI study by storescu, the reports at a storescp PACS.

The FHIR server answers slower than the service waits while the study is analysed: the imaging
results come regardless. Before the study, an ORU^R01 with NIHSS 14: the SR at the PACS names NIHSS 14 from HL7. After it,
each later-documented or corrected NIHSS (ORU^R01 22, a FHIR Observation 25 created after the
study, a REST post 30), all assessed before the analysis, brings a new SR version to the PACS
(same series, next instance number, naming the new NIHSS and its source, with the 90-day outcome
recomputed for it by each outcome model: a higher NIHSS, a higher CRD probability) and a new
summary image naming the new NIHSS and outcomes, and nothing else: no SEG is sent again. The
second report version reaches the PACS within 10 s of the HL7 ACK (the acceptance's number).
"""

from __future__ import annotations

import json
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import hl7
import pydicom
import pytest
from hl7.client import MLLPClient

from dicom_tools import dciodvfy_errors, free_port, requires_dciodvfy, requires_storescu, storescu
from fhir_server import FhirServer, nihss_observation
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.results.sr import clinical_input, reported_outcomes
from service_harness import Service, StoreSCP, wait_for

pytestmark = [pytest.mark.integration, requires_storescu, requires_dciodvfy, pytest.mark.timeout(300)]

PATIENT = "SGPH00000002"


def oru(value: int, control: str, assessed: datetime) -> str:
    return "\r".join([
        f"MSH|^~\\&|EHR|HOSP|STROKEGATE|SG|{assessed:%Y%m%d%H%M%S}+0000||ORU^R01|{control}|P|2.5.1",
        f"PID|1||{PATIENT}^^^HOSP^MR||PHANTOM^TWO",
        f"OBX|1|NM|72089-6^NIH stroke scale total score^LN||{value}|{{score}}|||||F|||{assessed:%Y%m%d%H%M%S}+0000",
    ]) + "\r"


def send_hl7(port: int, message: str) -> str:
    with MLLPClient("127.0.0.1", port) as client:
        answer = client.send_message(message)
    return str(hl7.parse(answer[1:-2].decode()).segment("MSA")(1))


def reports_at(pacs: StoreSCP) -> list[pydicom.Dataset]:
    found = [pydicom.dcmread(p) for p in pacs.files()]
    return sorted((ds for ds in found if ds.Modality == "SR"), key=lambda ds: int(ds.InstanceNumber))


def summaries_at(pacs: StoreSCP) -> list[pydicom.Dataset]:
    found = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.files()]
    return sorted((ds for ds in found if ds.SOPClassUID == SECONDARY_CAPTURE), key=lambda ds: int(ds.InstanceNumber))


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def test_nihss_by_hl7_fhir_and_rest_reaches_the_pacs_as_new_report_versions(tmp_path: Path) -> None:
    # DWI, ADC and a DSC-PWI with enough frames for the mismatch maps the 90-day outcome model reads
    write_patient(2, "mri", tmp_path / "phantom", PhantomOptions(mr_matrix=64, mr_slices=8, mr_frames=30))
    mri = tmp_path / "phantom" / PATIENT / "dicom" / "MR"
    now = datetime.now(timezone.utc).replace(microsecond=0)
    fhir = FhirServer().start()
    pacs = StoreSCP(tmp_path / "pacs", extra_args=("+uf",)).start()  # a resent object shows as a second file
    hl7_port = free_port()
    service = Service(tmp_path / "gate", f"sqlite:///{tmp_path / 'gate.db'}", [f"{pacs.address}?send=seg+sr+summary"],
                      env={"STROKEGATE_HL7_PORT": str(hl7_port), "STROKEGATE_FHIR_BASE_URL": fhir.url,
                           "STROKEGATE_FHIR_POLL_S": "0.5", "STROKEGATE_FHIR_TIMEOUT_S": "1",
                           "STROKEGATE_LEARNED_MODELS": "true"})
    fhir.delay_s = 3  # the FHIR server is too slow while the study is analysed: the imaging must not wait
    try:
        service.start()
        assert send_hl7(hl7_port, oru(14, "MSG0001", now - timedelta(minutes=10))) == "AA"
        storescu([mri / kind for kind in ("dwi", "adc", "pwi")], service.port, "STROKEGATE")
        first = wait_for(lambda: len(pacs.files()) >= 3 and pacs.files(), 120, "SEG, SR and summary at the PACS")
        (report,) = reports_at(pacs)
        items = clinical_input(report)
        assert items["72089-6"] == (14.0, "{score}") and items["NIHSSSOURCE"] == "HL7 v2 ORU^R01, id MSG0001"
        assert 0 < items["POORMRS90D"][0] < 1 and items["POORMRS90D"][1] == "{probability}"
        assert items["OUTCOMEINPUTS"].startswith("outcome-crd ") and "NIHSS 14 (HL7 v2 ORU^R01" in items["OUTCOMEINPUTS"]
        both = reported_outcomes(report)  # each model's probability, with its identification
        assert set(both) == {"outcome-crd", "outcome-cnn-lstm"}, both
        assert 0 < both["outcome-cnn-lstm"][0] < 1 and "NIHSS 14 (HL7 v2 ORU^R01" in both["outcome-cnn-lstm"][1]
        study_uid = report.StudyInstanceUID
        assert "FHIR search failed" in service.log.read_text()
        fhir.delay_s = 0

        assert send_hl7(hl7_port, oru(22, "MSG0002", now - timedelta(minutes=9))) == "AA"
        acknowledged = time.monotonic()
        wait_for(lambda: len(reports_at(pacs)) >= 2, 10, "the second report version within 10 s of the ACK (HL7 NIHSS 22)")
        assert time.monotonic() - acknowledged <= 10
        fhir.create(nihss_observation(PATIENT, 25, now - timedelta(minutes=8)))
        wait_for(lambda: len(reports_at(pacs)) >= 3, 30, "the third report version (FHIR NIHSS 25)")
        body = json.dumps({"patient_id": PATIENT, "patient_issuer": "HOSP", "value": 30, "request_id": "r-1",
                           "assessed_at": (now - timedelta(minutes=7)).isoformat()}).encode()
        request = urllib.request.Request(f"{service.url}/api/nihss", data=body, method="POST", headers={
            "Authorization": f"Bearer {service.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
        wait_for(lambda: len(reports_at(pacs)) >= 4, 30, "the fourth report version (REST NIHSS 30)")

        reports = reports_at(pacs)
        assert [int(r.InstanceNumber) for r in reports] == [1, 2, 3, 4]
        assert len({r.SeriesInstanceUID for r in reports}) == 1 and len({r.SOPInstanceUID for r in reports}) == 4
        assert [clinical_input(r)["72089-6"][0] for r in reports] == [14, 22, 25, 30]
        outcome = [clinical_input(r)["POORMRS90D"][0] for r in reports]  # recomputed, imaging not re-run
        assert outcome == sorted(outcome) and outcome[1] > outcome[0], outcome
        assert all(f"NIHSS {n} (" in clinical_input(r)["OUTCOMEINPUTS"] for n, r in zip((14, 22, 25, 30), reports))
        fused = [reported_outcomes(r)["outcome-cnn-lstm"] for r in reports]  # re-fused from the stored module probabilities
        assert all(f"NIHSS {n} (" in text for n, (_, text) in zip((14, 22, 25, 30), fused))
        assert [clinical_input(r)["NIHSSSOURCE"].split(",")[0] for r in reports] == [
            "HL7 v2 ORU^R01", "HL7 v2 ORU^R01", "FHIR R4 Observation", "StrokeGate REST API"]
        wait_for(lambda: len(summaries_at(pacs)) >= 4, 30, "a new summary image with each report version")
        summaries = summaries_at(pacs)
        assert [int(s.InstanceNumber) for s in summaries] == [1, 2, 3, 4] and len({s.SeriesInstanceUID for s in summaries}) == 1
        assert len(pacs.files()) == len(first) + 6  # three new reports and three new summaries: no SEG again
        for path in pacs.files():
            if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR":
                assert dciodvfy_errors(path) == [], path
        deliveries = service.get("/api/deliveries")
        assert sorted(d["kind"] for d in deliveries) == ["SEG", "SR", "SR", "SR", "SR", "SUMMARY", "SUMMARY", "SUMMARY", "SUMMARY"]

        nihss = service.get(f"/api/studies/{study_uid}/nihss")
        assert nihss["nihss_used"]["value"] == 30 and nihss["nihss_used"]["source"] == "rest"
        assert [r["value"] for r in nihss["records"]] == [30, 25, 22, 14]
        assert [r["revision"] for r in nihss["clinical_results"]] == [1, 2, 3, 4]
        job = service.get(f"/api/studies/{study_uid}")["jobs"][-1]
        assert job["findings"]["nihss"]["value"] == 30 and job["findings"]["clinical_revision"] == 4
        assert job["findings"]["outcome"]["nihss"]["value"] == 30
        assert job["findings"]["outcome"]["probability_mrs_3_6_90d"] == pytest.approx(outcome[-1], abs=1e-4)
        assert job["findings"]["outcome_cnn_lstm"]["nihss"]["value"] == 30
        assert job["findings"]["outcome_cnn_lstm"]["probability_mrs_3_6_90d"] == pytest.approx(fused[-1][0], abs=1e-4)
        assert PATIENT not in service.log.read_text()  # identifiers stay out of the log (FHIR URLs hold them)
    finally:
        service.stop()
        pacs.stop()
        fhir.stop()
