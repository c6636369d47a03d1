"""One study version in, Findings and result objects out: the same code for the service's workers
and for ``strokegate process``.

Which analysis runs is decided from the study's series (``imaging.classify``), first match:

1. DWI (b = 0 and b ~ 1000) or ADC: the MRI diffusion core (ADC below the threshold); with a
   DSC-PWI series as well, the perfusion-diffusion mismatch (Tmax from the DSC, core from ADC);
2. a CT perfusion series: CT perfusion (core rCBF, hypoperfusion Tmax, mismatch);
3. forwarded vendor perfusion maps (CBF and Tmax at least): core and penumbra from the maps;
4. anything else: InputError naming what the study holds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.uid import UID

from service.analysis.ctp_model import CtpModelRequest
from service.analysis.ctp_perfusion import CtpParameters, analyse_ctp
from service.analysis.diffusion_core import analyse_diffusion_core
from service.analysis.final_infarct_model import add_final_infarct
from service.analysis.outcome_findings import add_outcome
from service.analysis.outcome_model import DEFAULT_CARD
from service.findings import SEG, SR, SUMMARY, CoreMethod, Findings, NihssUsed, ResultCategory, ResultKind, SeriesKind
from service.analysis.mri_perfusion import MriPerfusionParameters, add_mismatch, dsc_maps
from service.analysis.vendor_maps import MapParameters, analyse_vendor_maps
from service.delivery.outbox import ResultFile
from service.errors import InputError
from service.imaging.classify import classify
from service.imaging.volumes import group_series
from service.inference.engine import Backend
from service.inference.model_set import ModelSet
from service.ops import metrics
from service.perfusion.thresholds import Defuse3Criteria
from service.results.maps import MAP_STYLES, build_colour_series, build_parametric_map
from service.results.seg import build_seg
from service.results.sr import build_sr
from service.results.summary import build_summary

if TYPE_CHECKING:
    from service.config import Settings


@dataclass(frozen=True)
class AnalysisParameters:
    """Every threshold the analyses use; their defaults live in ``Settings`` alone."""

    adc_threshold: float  # 1e-6 mm2/s: MRI core below this
    min_lesion_ml: float  # connected components smaller than this are removed
    core_rcbf: float  # CT (and vendor map) core: CBF below this fraction of contralateral normal
    tmax_threshold_s: float  # hypoperfused: Tmax above this
    vessel_cbv: float  # CT perfusion and vendor maps: voxels above this CBV (mL/100 g) are vessels
    anatomy_detail: bool  # CT perfusion: grey/white detail of CBF and CBV from the temporal mean
    criteria: Defuse3Criteria  # target-mismatch profile
    ctp_core_method: CoreMethod = CoreMethod.THRESHOLD  # whose core the CT perfusion verdict uses
    models: ModelSet | None = None  # the learned models to run beside the threshold methods; None: none

    @classmethod
    def from_settings(cls, settings: Settings) -> AnalysisParameters:
        """The parameters the settings name (``adc_core_threshold``, ``core_rcbf_threshold``, ...)."""
        return cls(
            adc_threshold=settings.adc_core_threshold,
            min_lesion_ml=settings.min_lesion_ml,
            core_rcbf=settings.core_rcbf_threshold,
            tmax_threshold_s=settings.tmax_threshold_s,
            vessel_cbv=settings.vessel_cbv_threshold,
            anatomy_detail=settings.ctp_anatomy_detail,
            criteria=Defuse3Criteria(
                max_core_ml=settings.target_max_core_ml,
                min_ratio=settings.target_min_mismatch_ratio,
                min_mismatch_ml=settings.target_min_mismatch_ml,
            ),
            ctp_core_method=CoreMethod(settings.ctp_core_method),
            models=ModelSet(settings.models_dir, Backend(settings.inference_backend), settings.engine_cache_dir)
            if settings.learned_models else None,
        )


@dataclass
class StudyOutcome:
    findings: Findings
    objects: list[tuple[ResultKind, Dataset]]


@dataclass
class StudySeries:
    """The study's series by kind: each a list of its instances' file names."""

    by_kind: dict[SeriesKind, list[list[str]]] = field(default_factory=dict)

    def get(self, kind: SeriesKind) -> list[list[str]]:
        return self.by_kind.get(kind, [])

    def files(self, kind: SeriesKind) -> list[str]:
        """Every file of every series of ``kind``."""
        return [name for series in self.get(kind) for name in series]

    def describe(self) -> str:
        """E.g. "2 other, 1 flair" (for error messages)."""
        return ", ".join(f"{len(s)} {kind}" for kind, s in sorted(self.by_kind.items())) or "no series"


MIN_SLICES = 2
"""A volume in mL needs a stack: one slice gives an area times a thickness, not a lesion volume."""

MODALITY_OF_SOP_CLASS = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4": "MR",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",  # Enhanced MR Image Storage
}
"""The Modality each image storage SOP class we analyse requires (PS3.3 A.3, A.4, A.36, A.38)."""


def study_series(paths: list[Path] | list[str]) -> StudySeries:
    """Group the instances at ``paths`` into series and classify each from its headers.
    InputError when an instance's Modality or dataset does not match its SOP class."""
    found = StudySeries()
    for uid, series in group_series(paths, headers_only=True).items():
        for ds in series:
            check_sop_class(ds, uid)
        found.by_kind.setdefault(classify(series), []).append([str(ds.filename) for ds in series])
    return found


def check_sop_class(ds: Dataset, series_uid: str) -> None:
    """InputError when an instance is not what its SOP class says: its dataset's SOP Class UID
    differs from the one it was stored as, or its Modality from the one the class requires (an
    MR image sent as CT Image Storage would otherwise be read with CT's units and rules)."""
    meta = getattr(ds, "file_meta", None)
    stored_as = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    own = str(ds.get("SOPClassUID", "") or "")
    if stored_as and own and own != stored_as:
        raise InputError(f"series {series_uid}: an instance of SOP class {own} was sent as {stored_as}")
    sop_class = own or stored_as
    required = MODALITY_OF_SOP_CLASS.get(sop_class)
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if required is not None and modality != required:
        name = UID(sop_class).name
        raise InputError(f"series {series_uid}: Modality {modality or '(none)'} does not match its SOP class {name} "
                         f"(which requires {required}); the study is not analysed")


def analyse_study(
    paths: list[Path], version: int, parameters: AnalysisParameters, study_uid: str | None = None,
    nihss: NihssUsed | None = None, with_reader_series: bool = True,
) -> StudyOutcome:
    """Analyse the instances at ``paths`` (one study) as result version ``version``. ``nihss``, the
    patient's NIHSS if known (with where it came from), goes to the learned models trained to take
    it, and the results name it as the clinical input (None: "NIHSS not available: imaging only").

    The outcome's objects start with the SEG and the SR, what a stroke team decides on; with
    ``with_reader_series`` false they are all it holds, and ``add_reader_series`` draws the rest
    later (a worker sends the SEG and SR before it draws the maps).

    Raises InputError when the study cannot be analysed, with the reason.
    """
    if not paths:
        raise InputError("the study has no instances")
    started = time.perf_counter()
    series = study_series(paths)
    classified = time.perf_counter() - started
    findings = dispatch(series, version, parameters, study_uid, nihss.value if nihss is not None else None)
    if findings.geometry.shape[0] < MIN_SLICES:
        raise InputError(f"the {findings.analysis} analysis has {findings.geometry.shape[0]} slice; "
                         f"a lesion volume needs at least {MIN_SLICES} slices")
    findings.timings_s = {"classify": classified, **findings.timings_s}
    findings.nihss = nihss
    if parameters.models is not None:  # the 90-day outcome is a learned model's
        started = time.perf_counter()
        findings = add_outcome(findings, nihss, parameters.models.folder / DEFAULT_CARD.name)
        findings.timings_s["outcome"] = time.perf_counter() - started
    started = time.perf_counter()
    seg = build_seg(findings)
    outcome = StudyOutcome(findings, [(SEG, seg), (SR, build_sr(findings, seg))])
    findings.timings_s["seg_sr"] = time.perf_counter() - started
    _observe(findings.timings_s, tuple(findings.timings_s))
    if with_reader_series:
        add_reader_series(outcome)
    return outcome


def add_reader_series(outcome: StudyOutcome) -> list[tuple[ResultKind, Dataset]]:
    """Draw the outcome's reader series (``reader_series``), append them to its objects and return them."""
    started = time.perf_counter()
    drawn = reader_series(outcome.findings)
    outcome.objects += drawn
    outcome.findings.timings_s["reader_series"] = time.perf_counter() - started
    _observe(outcome.findings.timings_s, ("reader_series",))
    return drawn


def _observe(timings_s: dict[str, float], stages: tuple[str, ...]) -> None:
    for stage in stages:
        metrics.STAGE_SECONDS.labels(stage=stage).observe(timings_s[stage])


def reader_series(findings: Findings) -> list[tuple[ResultKind, Dataset]]:
    """What a radiologist reads in any viewer: the summary image and, per map, its colour series
    (one image per slice) and its values (Parametric Map)."""
    objects: list[tuple[ResultKind, Dataset]] = [(SUMMARY, build_summary(findings))]
    for name in sorted(findings.maps):
        if name not in MAP_STYLES:
            continue
        colour = build_colour_series(findings, name)
        objects += [(ResultKind(ResultCategory.MAPS, name, index), image) for index, image in enumerate(colour, start=1)]
        objects.append((ResultKind(ResultCategory.VALUES, name), build_parametric_map(findings, name)))
    return objects


def dispatch(series: StudySeries, version: int, parameters: AnalysisParameters, study_uid: str | None,
             nihss: int | None = None) -> Findings:
    """Run the analysis the study's series call for (see the module docstring)."""
    if series.get(SeriesKind.DWI) or series.get(SeriesKind.ADC):
        return _analyse_mri(series, version, parameters, study_uid)
    if series.get(SeriesKind.CTP):
        return _analyse_ctp(series, version, parameters, study_uid, nihss)
    if series.get(SeriesKind.CT_MAP):
        return analyse_vendor_maps(
            series.files(SeriesKind.CT_MAP), study_uid=study_uid, version=version,
            parameters=MapParameters(
                core_rcbf=parameters.core_rcbf, tmax_threshold_s=parameters.tmax_threshold_s,
                min_lesion_ml=parameters.min_lesion_ml, vessel_cbv=parameters.vessel_cbv, criteria=parameters.criteria,
            ),
        )
    raise InputError(
        "nothing to analyse: the study has no DWI or ADC, no CT perfusion and no perfusion-map series "
        f"(found: {series.describe()})"
    )


def _analyse_mri(series: StudySeries, version: int, parameters: AnalysisParameters, study_uid: str | None) -> Findings:
    """Diffusion core; with DSC-PWI, the mismatch. A DSC series that cannot be analysed leaves
    the core reported with a QC flag saying why (the core does not depend on it)."""
    core = analyse_diffusion_core(
        {"dwi": series.files(SeriesKind.DWI), "adc": series.files(SeriesKind.ADC)}, study_uid=study_uid, version=version,
        adc_threshold=parameters.adc_threshold, min_lesion_ml=parameters.min_lesion_ml,
    )
    candidates = series.get(SeriesKind.PWI)
    if not candidates:
        return _final_infarct(core, parameters)
    chosen = max(candidates, key=len)
    mri = MriPerfusionParameters(
        tmax_threshold_s=parameters.tmax_threshold_s, min_lesion_ml=parameters.min_lesion_ml, criteria=parameters.criteria
    )
    try:
        maps = dsc_maps(chosen, mri)
    except InputError as error:
        return _final_infarct(replace(core, qc_flags=[*core.qc_flags, f"DSC perfusion not analysed: {error}"]), parameters)
    findings = add_mismatch(core, maps, mri)
    if len(candidates) > 1:
        findings.qc_flags.append(f"{len(candidates)} DSC perfusion series; used series {maps.series_uid}")
    return _final_infarct(findings, parameters)


def _final_infarct(findings: Findings, parameters: AnalysisParameters) -> Findings:
    """Seed 001's predicted final infarcts (both scenarios) where learned models are on."""
    if parameters.models is None:
        return findings
    started = time.perf_counter()
    findings = add_final_infarct(findings, parameters.models)
    findings.timings_s["final_infarct"] = time.perf_counter() - started
    return findings


def _analyse_ctp(series: StudySeries, version: int, parameters: AnalysisParameters, study_uid: str | None,
                 nihss: int | None) -> Findings:
    """CT perfusion of the largest CTP series (and the learned model's core and penumbra beside
    the threshold ones, and the predicted final infarcts), its verdict by the configured DEFUSE 3 criteria and empty penumbra
    segments left out."""
    chosen = max(series.get(SeriesKind.CTP), key=len)
    findings = analyse_ctp(
        chosen, study_uid=study_uid, version=version,
        parameters=CtpParameters(
            criteria=parameters.criteria, core_rcbf=parameters.core_rcbf, tmax_threshold_s=parameters.tmax_threshold_s,
            min_lesion_ml=parameters.min_lesion_ml, vessel_cbv=parameters.vessel_cbv,
            anatomy_detail=parameters.anatomy_detail,
        ),
        model=CtpModelRequest(parameters.models, nihss) if parameters.models is not None else None,
        core_method=parameters.ctp_core_method,
    )
    findings.segments = [s for s in findings.segments if s.key != "penumbra" or s.mask.any()]
    if len(series.get(SeriesKind.CTP)) > 1:
        findings.qc_flags.append(f"{len(series.get(SeriesKind.CTP))} CT perfusion series; used the largest")
    return _final_infarct(findings, parameters)


def write_results(
    outcome: StudyOutcome, results_dir: Path, objects: list[tuple[ResultKind, Dataset]] | None = None,
) -> list[ResultFile]:
    """Write each result object (``objects``, default all the outcome's) to
    ``results_dir/<study UID>/v<version>/<kind>.dcm`` atomically."""
    folder = Path(outcome.findings.study_uid) / f"v{outcome.findings.version}"
    (results_dir / folder).mkdir(parents=True, exist_ok=True)
    files = []
    for kind, ds in outcome.objects if objects is None else objects:
        relative = folder / f"{kind.name}.dcm"
        temporary = results_dir / relative.with_suffix(".part")
        ds.save_as(temporary, enforce_file_format=True)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, results_dir / relative)
        files.append(ResultFile(kind, str(ds.SOPInstanceUID), str(ds.SOPClassUID), relative.as_posix()))
    return files
