"""The synthetic phantom's DICOM studies are read, validated and stored by real DICOM tools.

Every study is written by the real command line (``strokegate phantom`` in a subprocess) and
then checked with dcmtk ``dcmdump`` (every file parses), dicom3tools ``dciodvfy`` (no IOD
errors on the first and last instance of every series) and Orthanc (accepts the ``--kind all``
patient over C-STORE from dcmtk ``storescu``, filed as one patient with a CT and an MR study).

Each kind is generated once per module. Only ``--kind ctp`` uses the default size (16 slices x
40 time points at 256 x 256, which doubles as a realistic-size check); the others use a smaller
CT grid, since they are not about size.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_tools import (
    OrthancServer,
    dciodvfy_errors,
    requires_dciodvfy,
    requires_orthanc,
    requires_storescu,
    storescu,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SEED = 12345
PATIENT_ID = f"SGPH{SEED:08d}"
SMALL = ("--ct-matrix", "128", "--ct-frames", "12")  # for the kinds whose test is not about size

CT_SERIES = {"ctp", "cbf", "cbv", "mtt", "ttp", "tmax"}
CT_MAP_SERIES = CT_SERIES - {"ctp"}
MR_SERIES = {"dwi", "adc", "flair", "pwi"}
EXPECTED_SERIES: dict[str, dict[str, set[str]]] = {
    "ctp": {"CT": {"ctp"}},
    "maps": {"CT": CT_MAP_SERIES},
    "mri": {"MR": MR_SERIES},
    "all": {"CT": CT_SERIES, "MR": MR_SERIES},
}
KIND_ARGS: dict[str, tuple[str, ...]] = {"ctp": (), "maps": SMALL, "mri": SMALL, "all": SMALL}
KINDS = tuple(EXPECTED_SERIES)

requires_dcmdump = pytest.mark.skipif(
    shutil.which("dcmdump") is None, reason="dcmtk dcmdump not installed (apt-get install dcmtk)"
)


def strokegate_exe() -> Path:
    """The ``strokegate`` console script of the interpreter running the tests."""
    exe = Path(sys.executable).parent / "strokegate"
    if not exe.exists():
        pytest.skip(f"strokegate console script not found next to {sys.executable}")
    return exe


def run_cli(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    """Run ``strokegate`` with ``args``; wide, colourless output so messages do not wrap."""
    return subprocess.run(
        [str(strokegate_exe()), *args],
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dicom_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def series_dirs(dicom: Path) -> list[Path]:
    """``dicom/<modality>/<series>`` folders."""
    return sorted(p for p in dicom.glob("*/*") if p.is_dir())


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``phantom(kind)`` -> the patient's ``dicom`` folder, written once per kind per module."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            out = tmp_path_factory.mktemp(f"phantom-{kind}")
            proc = run_cli("phantom", "--kind", kind, "--out", str(out), "--seed", str(SEED), *KIND_ARGS[kind])
            assert proc.returncode == 0, (
                f"strokegate phantom --kind {kind} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
            made[kind] = out / PATIENT_ID / "dicom"
        return made[kind]

    yield get


# -- layout ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_kind_writes_its_series(phantom: Callable[[str], Path], kind: str) -> None:
    dicom = phantom(kind)
    found: dict[str, set[str]] = {}
    for folder in series_dirs(dicom):
        found.setdefault(folder.parent.name, set()).add(folder.name)
        assert dicom_files(folder), f"empty series folder {folder}"
    assert found == EXPECTED_SERIES[kind]


# -- dcmtk dcmdump: every file parses -------------------------------------------


@requires_dcmdump
@pytest.mark.parametrize("kind", KINDS)
def test_dcmdump_reads_every_file(phantom: Callable[[str], Path], kind: str) -> None:
    dicom = phantom(kind)
    files = dicom_files(dicom)
    proc = subprocess.run(
        ["dcmdump", "+r", "+sd", str(dicom)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    problems = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith(("E:", "F:"))]
    assert proc.returncode == 0, f"dcmdump exited {proc.returncode}:\n" + "\n".join(problems[:20] or [proc.stderr])
    assert problems == []
    # One "# Dicom-File-Format" header per file: dcmdump read all of them as DICOM files.
    assert proc.stdout.count("# Dicom-File-Format") == len(files)


# -- dicom3tools dciodvfy: no IOD errors -----------------------------------------


@requires_dciodvfy
@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy_no_errors_first_and_last_of_every_series(phantom: Callable[[str], Path], kind: str) -> None:
    dicom = phantom(kind)
    folders = series_dirs(dicom)
    assert len(folders) == sum(len(s) for s in EXPECTED_SERIES[kind].values())
    errors: dict[str, list[str]] = {}
    for folder in folders:
        files = dicom_files(folder)  # IM00001.dcm ... zero-padded, so sorted = instance order
        for path in dict.fromkeys((files[0], files[-1])):
            if found := dciodvfy_errors(path):
                errors[str(path.relative_to(dicom))] = found
    assert errors == {}


# -- realistic size: the default CT perfusion series ------------------------------


def test_ctp_default_is_16_slices_by_40_time_points(phantom: Callable[[str], Path]) -> None:
    files = dicom_files(phantom("ctp") / "CT" / "ctp")
    assert len(files) == 16 * 40
    headers = [dcmread(path, stop_before_pixels=True) for path in files]
    assert {ds.SOPClassUID for ds in headers} == {"1.2.840.10008.5.1.4.1.1.2"}  # CT Image Storage
    assert len({ds.SeriesInstanceUID for ds in headers}) == 1
    assert len({ds.SOPInstanceUID for ds in headers}) == 640
    assert sorted(int(ds.InstanceNumber) for ds in headers) == list(range(1, 641))
    assert {(int(ds.Rows), int(ds.Columns)) for ds in headers} == {(256, 256)}
    acquisitions = Counter(int(ds.AcquisitionNumber) for ds in headers)
    assert sorted(acquisitions) == list(range(1, 41))
    assert set(acquisitions.values()) == {16}  # every time point covers every slice
    positions = {tuple(round(float(x), 3) for x in ds.ImagePositionPatient) for ds in headers}
    assert len(positions) == 16
    slots = {(int(ds.AcquisitionNumber), tuple(float(x) for x in ds.ImagePositionPatient)) for ds in headers}
    assert len(slots) == 640  # no (time point, slice) written twice
    assert {str(ds.PatientID) for ds in headers} == {PATIENT_ID}


# -- Orthanc accepts the --kind all patient over C-STORE ---------------------------


@pytest.fixture(scope="module")
def stored_all(phantom: Callable[[str], Path], orthanc_module: OrthancServer) -> tuple[OrthancServer, Path]:
    """The ``--kind all`` patient sent to Orthanc with dcmtk storescu (the whole dicom folder)."""
    dicom = phantom("all")
    proc = storescu(dicom, orthanc_module.dicom_port, orthanc_module.aet, timeout=180)
    failures = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("E:", "F:"))]
    assert failures == [], "storescu reported:\n" + "\n".join(failures[:20])
    return orthanc_module, dicom


@requires_orthanc
@requires_storescu
def test_orthanc_stores_every_instance(stored_all: tuple[OrthancServer, Path]) -> None:
    orthanc, dicom = stored_all
    stats = orthanc.get("/statistics")
    assert stats["CountInstances"] == len(dicom_files(dicom)), orthanc.log_text()[-4000:]


@requires_orthanc
@requires_storescu
def test_orthanc_files_one_patient_with_ct_and_mr_study(stored_all: tuple[OrthancServer, Path]) -> None:
    orthanc, _ = stored_all
    patients = orthanc.get("/patients?expand")
    assert [p["MainDicomTags"]["PatientID"] for p in patients] == [PATIENT_ID]
    studies = orthanc.get("/studies?expand")
    assert len(studies) == 2
    assert {s["PatientMainDicomTags"]["PatientID"] for s in studies} == {PATIENT_ID}
    assert sorted(patients[0]["Studies"]) == sorted(s["ID"] for s in studies)


@requires_orthanc
@requires_storescu
def test_orthanc_series_per_study_match_what_was_written(stored_all: tuple[OrthancServer, Path]) -> None:
    orthanc, dicom = stored_all
    # What was written: per modality, SeriesInstanceUID -> number of files.
    written: dict[str, dict[str, int]] = {}
    study_uid: dict[str, str] = {}
    for folder in series_dirs(dicom):
        files = dicom_files(folder)
        ds = dcmread(files[0], stop_before_pixels=True)
        written.setdefault(folder.parent.name, {})[ds.SeriesInstanceUID] = len(files)
        study_uid[folder.parent.name] = ds.StudyInstanceUID
    assert {m: len(s) for m, s in written.items()} == {"CT": 6, "MR": 4}

    stored: dict[str, dict[str, int]] = {}
    for study in orthanc.get("/studies?expand"):
        modality = {v: k for k, v in study_uid.items()}[study["MainDicomTags"]["StudyInstanceUID"]]
        for series_id in study["Series"]:
            series = orthanc.get(f"/series/{series_id}")
            assert series["MainDicomTags"]["Modality"] == modality
            stored.setdefault(modality, {})[series["MainDicomTags"]["SeriesInstanceUID"]] = len(series["Instances"])
    assert stored == written


# -- command line: bad --kind --------------------------------------------------------


def test_cli_rejects_unknown_kind(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("phantom", "--kind", "pet", "--out", str(out), "--seed", str(SEED), timeout=60)
    assert proc.returncode != 0
    text = re.sub(r"[\s│╭╮╰╯─]+", " ", proc.stdout + proc.stderr)  # drop rich's error box
    assert "Traceback" not in text
    assert re.search(r"Invalid value for '?--kind'?: must be one of ctp, mri, maps, all", text), text
    assert not list(tmp_path.rglob("SGPH*"))  # no patient folder
    assert not out.exists() or not any(out.iterdir())  # nothing written at all
