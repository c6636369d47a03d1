"""Security as a hospital network sees it, against `strokegate serve` and dcmtk: DICOM TLS from
storescu through StrokeGate to a storescp that requires TLS and a client certificate (certificates
made here at run time); plain and certificate-less associations refused; HTTPS; bearer tokens with
two roles; the called AE title checked; bounded metric labels; no UIDs in the log; owner-only files."""

from __future__ import annotations

import http.client
import json
import stat
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from certificates import TestCA
from dicom_tools import requires_storescu, storescu
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service_harness import STROKEGATE, Service, StoreSCP, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def vendor_maps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic CT perfusion study as vendor maps (CBF, CBV, MTT, TTP, Tmax): quick to analyse."""
    out = tmp_path_factory.mktemp("maps")
    write_patient(5, "maps", out, PhantomOptions(ct_matrix=64, ct_slices=6))
    return out / "SGPH00000005" / "dicom" / "CT"


def modalities(folder: Path) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in folder.iterdir() if p.is_file()}


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@requires_storescu
def test_dicom_tls_from_scanner_through_strokegate_to_pacs_and_plain_refused(
    tmp_path: Path, ca: TestCA, vendor_maps: Path
) -> None:
    node, pacs_leaf, scanner = ca.issue("strokegate"), ca.issue("pacs"), ca.issue("scanner")
    # storescp requires TLS and a client certificate from CA (dcmtk's default -rc): StrokeGate's sender must present one
    pacs = StoreSCP(tmp_path / "pacs", extra_args=("+tls", str(pacs_leaf.key), str(pacs_leaf.certificate),
                                                  "+cf", str(ca.certificate), "-pw"))
    env = {
        "STROKEGATE_DICOM_TRANSPORT": "tls", "STROKEGATE_TLS_CERTIFICATE": str(node.certificate),
        "STROKEGATE_TLS_KEY": str(node.key), "STROKEGATE_TLS_CA": str(ca.certificate),
        "STROKEGATE_HTTP_TLS_CERTIFICATE": str(node.certificate), "STROKEGATE_HTTP_TLS_KEY": str(node.key),
    }
    service = Service(tmp_path / "strokegate", f"sqlite:///{tmp_path / 'strokegate.db'}",
                      [f"{pacs.address}?send=seg+sr&tls"], env=env, https_ca=ca.certificate)
    scanner_tls = ("+tls", str(scanner.key), str(scanner.certificate), "+cf", str(ca.certificate), "-pw")
    try:
        pacs.start()
        service.start()  # ready over HTTPS, checked against the CA
        storescu(vendor_maps, service.port, "STROKEGATE", "SCANNER", extra_args=scanner_tls)
        wait_for(lambda: {"SEG", "SR"} <= modalities(pacs.folder), 120, f"SEG and SR at the TLS PACS (log: {service.log})")

        plain = dcmtk("echoscu", "-aec", "STROKEGATE", "127.0.0.1", str(service.port))
        assert plain.returncode != 0 and "Association Rejected" in plain.stdout + plain.stderr
        no_certificate = dcmtk("echoscu", "-aec", "STROKEGATE", "+tla", "+cf", str(ca.certificate), "127.0.0.1", str(service.port))
        assert no_certificate.returncode != 0
        with_certificate = dcmtk("echoscu", "-aec", "STROKEGATE", *scanner_tls, "127.0.0.1", str(service.port))
        assert with_certificate.returncode == 0, with_certificate.stderr

        assert service.request("/healthz") == (200, b'{"status":"ok"}')
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP to the HTTPS port
            urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/healthz", timeout=10).read()
        log = service.log.read_text()
        assert "plain DICOM on a TLS-only port" in log
        assert "TLS handshake with 127.0.0.1 failed" in log
        assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "strokegate" / "results").rglob("*.dcm")} == {0o600}
        sent = [pydicom.dcmread(p, stop_before_pixels=True) for p in vendor_maps.rglob("*.dcm")]
        uids = {str(ds[k].value) for ds in sent for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        assert not [uid for uid in uids if uid in log]
    finally:
        service.stop()
        pacs.stop()


@requires_storescu
def test_tokens_roles_called_ae_metric_labels_log_tags_and_file_modes(tmp_path: Path, vendor_maps: Path) -> None:
    (tmp_path / "odd").mkdir()
    for name, modality in (("odd", "ZZ"), ("broken", "M.")):
        # "ZZ" is a well-formed modality nobody expects; "M." (as a byte-flipped header had it) is
        # not a code string and is quarantined: neither may become a metric label
        odd = pydicom.dcmread(sorted((vendor_maps / "cbf").glob("*.dcm"))[0])
        odd.Modality = modality
        odd.StudyInstanceUID, odd.SeriesInstanceUID, odd.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        odd.file_meta.MediaStorageSOPInstanceUID = odd.SOPInstanceUID
        odd.save_as(tmp_path / "odd" / f"{name}.dcm")
    odd = pydicom.dcmread(tmp_path / "odd" / "odd.dcm", stop_before_pixels=True)
    url = f"sqlite:///{tmp_path / 'strokegate' / 'strokegate.db'}"
    service = Service(tmp_path / "strokegate", url, [])
    try:
        service.start()
        made = subprocess.run([str(STROKEGATE), "token", "create", "--role", "reader", "--name", "alice", "--database-url", url],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and len(made.stdout.splitlines()) == 1, made.stderr
        reader = made.stdout.strip()

        assert service.request("/healthz")[0] == 200 and service.request("/readyz")[0] == 200  # open, for probes
        assert service.request("/api/studies")[0] == 401
        assert service.request("/api/studies", "sgt_not-a-token")[0] == 401
        assert service.request("/api/studies", reader)[0] == 200
        assert service.request("/metrics")[0] == 401 and service.request("/metrics", reader)[0] == 200
        assert service.request("/docs")[0] == 404 and service.request("/openapi.json")[0] == 404
        assert service.request("/api/deliveries/retry", reader, "POST")[0] == 403
        assert service.request("/api/deliveries/retry", service.token, "POST") == (200, b'{"due_now":0}')

        wrong = dcmtk("echoscu", "-aec", "NOT-US", "127.0.0.1", str(service.port))
        assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr

        storescu(tmp_path / "odd" / "odd.dcm", service.port, "STROKEGATE")
        study = odd.StudyInstanceUID
        wait_for(lambda: service.get(f"/api/studies/{study}", {}).get("state") in ("done", "failed"), 60, "the analysis")
        assert service.request(f"/api/studies/{study}/rerun", reader, "POST")[0] == 403
        status, body = service.request(f"/api/studies/{study}/rerun", service.token, "POST")
        assert status == 202 and json.loads(body)["version"] == 2
        assert service.request("/api/studies/1.2.3.4.5/rerun", service.token, "POST")[0] == 404
        wait_for(lambda: any(j["version"] == 2 for j in service.get("/api/jobs")), 30, "the re-run's job")

        storescu(tmp_path / "odd" / "broken.dcm", service.port, "STROKEGATE")
        wait_for(lambda: service.metric("strokegate_instances_quarantined_total") >= 1, 30, "the quarantine")
        assert service.metric("strokegate_instances_received_total", modality="other") == 1
        metrics_text = service.get("/metrics")
        assert 'modality="M."' not in metrics_text and 'modality="ZZ"' not in metrics_text

        spool = tmp_path / "strokegate" / "spool"
        tag = subprocess.run([str(STROKEGATE), "log-tag", study, "--spool-dir", str(spool)],
                             capture_output=True, text=True, timeout=60).stdout.strip()
        log = service.log.read_text()
        assert f"harness re-ran study {tag}: job" in log  # traceable by its tag
        for uid in (study, odd.SeriesInstanceUID, odd.SOPInstanceUID):
            assert uid not in log
        assert "no destination set" in log

        def mode(path: Path) -> int:
            return stat.S_IMODE(path.stat().st_mode)

        assert mode(spool) == mode(tmp_path / "strokegate" / "results") == 0o700
        assert mode(tmp_path / "strokegate" / "strokegate.db") == 0o600
        assert {mode(p) for p in spool.glob("*/*/*.dcm")} == {0o600}
    finally:
        service.stop()
