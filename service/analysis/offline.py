"""``strokegate process``: the service's analysis on a folder, without the network or a database."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from service.analysis.pipeline import AnalysisParameters, analyse_study
from service.config import Settings
from service.errors import InputError
from service.findings import NihssUsed
from service.imaging.discover import studies_in

log = logging.getLogger(__name__)


def process_folder(input_dir: Path, out: Path, settings: Settings, nihss: NihssUsed | None = None) -> list[Path]:
    """Analyse every study under ``input_dir``; write its result objects and findings.json.
    ``nihss``: the patient's NIHSS given on the command line, for the learned models that take it and
    named in the results (None: not known; the results say "NIHSS not available: imaging only").

    One study: results directly in ``out``; several: one sub-folder per study. Returns the paths
    written. Raises InputError if there is no DICOM or no study could be analysed.
    """
    studies, skipped = studies_in(input_dir)
    if skipped:
        log.info("%d files under %s are not DICOM and were skipped", len(skipped), input_dir)
    if not studies:
        raise InputError(f"no DICOM files under {input_dir}")
    parameters = AnalysisParameters.from_settings(settings)
    written: list[Path] = []
    errors: dict[str, str] = {}
    for index, (study_uid, paths) in enumerate(sorted(studies.items()), start=1):
        target = out if len(studies) == 1 else out / f"study-{index:03d}"
        try:
            outcome = analyse_study(paths, 1, parameters, study_uid=study_uid, nihss=nihss)
        except InputError as error:
            errors[study_uid] = str(error)
            target.mkdir(parents=True, exist_ok=True)
            (target / "error.txt").write_text(f"{error}\n")
            written.append(target / "error.txt")
            continue
        target.mkdir(parents=True, exist_ok=True)
        for kind, ds in outcome.objects:
            path = target / f"{kind}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
        findings = target / "findings.json"
        findings.write_text(json.dumps(outcome.findings.summary(), indent=2) + "\n")
        written.append(findings)
    if len(errors) == len(studies):
        raise InputError("; ".join(errors.values()))
    return written
