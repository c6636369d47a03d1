"""One study version in, Findings and result objects out: the same code for the service's workers
and for ``strokegate process``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from service.analysis.diffusion_core import analyse_diffusion_core
from service.analysis.findings import Findings
from service.delivery.outbox import ResultFile
from service.errors import InputError
from service.ops import metrics
from service.results.seg import build_seg
from service.results.sr import build_sr


@dataclass(frozen=True)
class AnalysisParameters:
    adc_threshold: float = 620.0  # 1e-6 mm2/s
    min_lesion_ml: float = 0.3


@dataclass
class StudyOutcome:
    findings: Findings
    objects: list[tuple[str, Dataset]]  # (kind, dataset): "SEG", "SR"


def analyse_study(paths: list[Path], version: int, parameters: AnalysisParameters, study_uid: str | None = None) -> StudyOutcome:
    """Analyse the instances at ``paths`` (one study) as result version ``version``.

    Raises InputError when the study cannot be analysed, with the reason.
    """
    if not paths:
        raise InputError("the study has no instances")
    findings = analyse_diffusion_core(
        paths, study_uid=study_uid, version=version,
        adc_threshold=parameters.adc_threshold, min_lesion_ml=parameters.min_lesion_ml,
    )
    started = time.perf_counter()
    seg = build_seg(findings)
    sr = build_sr(findings, seg)
    findings.timings_s["results"] = time.perf_counter() - started
    for stage, seconds in findings.timings_s.items():
        metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds)
    return StudyOutcome(findings, [("SEG", seg), ("SR", sr)])


def write_results(outcome: StudyOutcome, results_dir: Path) -> list[ResultFile]:
    """Write each result object to ``results_dir/<study UID>/v<version>/<kind>.dcm`` atomically."""
    folder = Path(outcome.findings.study_uid) / f"v{outcome.findings.version}"
    (results_dir / folder).mkdir(parents=True, exist_ok=True)
    files = []
    for kind, ds in outcome.objects:
        relative = folder / f"{kind}.dcm"
        temporary = results_dir / relative.with_suffix(".part")
        ds.save_as(temporary, enforce_file_format=True)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, results_dir / relative)
        files.append(ResultFile(kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), relative.as_posix()))
    return files
