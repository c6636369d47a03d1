"""Seed 001's predicted final infarcts as a stage of the MRI and the CT perfusion analyses: one
learned network per modality and reperfusion scenario, both scenarios run on the same inputs,
shown side by side.

Input: the MRI mismatch Findings (the diffusion core's high-b DWI and ADC, the DSC perfusion's
Tmax, CBF and CBV on the diffusion grid; the brain is where the ADC map is non-zero), or the CT
perfusion Findings (CBF, CBV, TTP, Tmax, the series' temporal MIP and the analysis's brain mask,
on the acquired grid). Output: two
segments ("Predicted final infarct if reperfused" / "... if not reperfused"), both volumes, their
difference (the tissue reperfusion would save), the Dice between them and the seed's responder
verdict. A study without the inputs, or a network that cannot run, gets no prediction and a QC
flag saying why; the rest of the analysis stands. Pixels of another size than the networks were
trained on are resampled to theirs (``inference.final_infarct``), with a QC flag saying so.
Each prediction includes the analysis's measured core (``including_core``): tissue infarcted at
imaging stays infarcted whether or not the patient is reperfused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from service.errors import InputError, ModelError
from service.findings import Analysis, Findings, MapName, Measurement, ModelInfo, Segment, SegmentKind
from service.inference.final_infarct import including_core, predict_final_infarct, trained_pixel_mm
from service.inference.final_infarct_inputs import Scenario, contract, model_name
from service.inference.model_set import ModelSet

MODALITIES = {Analysis.MRI_MISMATCH: "mri", Analysis.MRI_DIFFUSION_CORE: "mri", Analysis.CT_PERFUSION: "ct"}
"""Which networks (``final_infarct_inputs.model_name``) read each analysis's Findings."""
SEGMENT_KINDS = {Scenario.REPERFUSED: SegmentKind.FINAL_IF_REPERFUSED, Scenario.NOT_REPERFUSED: SegmentKind.FINAL_IF_NOT_REPERFUSED}
RESPONDER_MAX_DICE = 0.5
"""Seed 001: the two predictions differ (Dice below this) ..."""
RESPONDER_MIN_GROWTH = 1.2
"""... and the non-reperfused prediction is at least this many times the reperfused one."""


@dataclass(frozen=True)
class ScenarioComparison:
    """Both predictions' volumes (mL), their difference, their Dice and the responder verdict."""

    reperfused_ml: float
    not_reperfused_ml: float
    dice: float
    responder: bool

    @property
    def salvage_ml(self) -> float:
        """Tissue reperfusion would save: the non-reperfused minus the reperfused volume."""
        return self.not_reperfused_ml - self.reperfused_ml

    def measurements(self) -> dict[Measurement, float]:
        return {
            Measurement.FINAL_IF_REPERFUSED_VOLUME: self.reperfused_ml,
            Measurement.FINAL_IF_NOT_REPERFUSED_VOLUME: self.not_reperfused_ml,
            Measurement.REPERFUSION_SALVAGE: self.salvage_ml,
            Measurement.SCENARIO_DICE: self.dice,
            Measurement.RESPONDER: 1.0 if self.responder else 0.0,
        }


def compare_scenarios(reperfused: np.ndarray, not_reperfused: np.ndarray, voxel_ml: float) -> ScenarioComparison:
    """The two predictions compared as seed 001 does: responder when their Dice is below 0.5 and
    the non-reperfused volume is at least 1.2 times the reperfused one (and not empty)."""
    a, b = np.asarray(reperfused, dtype=bool), np.asarray(not_reperfused, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    overlap = 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total
    small, large = float(a.sum()) * voxel_ml, float(b.sum()) * voxel_ml
    return ScenarioComparison(small, large, overlap, overlap < RESPONDER_MAX_DICE and large > 0 and large >= RESPONDER_MIN_GROWTH * small)


@dataclass(frozen=True)
class NetworkInputs:
    """What both networks of a modality are fed: the channels' volumes and the brain mask, one grid."""

    modality: str
    volumes: dict[str, np.ndarray]
    brain: np.ndarray


def missing_inputs(findings: Findings) -> list[str]:
    """The inputs the networks need that ``findings`` lacks (empty: it has them all)."""
    if MODALITIES.get(findings.analysis) == "ct":
        missing = [name.title for name in (MapName.CBF, MapName.CBV, MapName.TTP, MapName.TMAX) if name not in findings.maps]
        missing += [] if findings.mip is not None else ["the CT perfusion series' temporal MIP"]
        return missing + ([] if findings.brain is not None else ["the CT perfusion analysis's brain mask"])
    missing = [] if findings.dwi is not None else ["a DWI with b >= 500 on the ADC grid"]
    missing += [name.title for name in (MapName.ADC, MapName.TMAX, MapName.CBF, MapName.CBV) if name not in findings.maps]
    return missing


def network_inputs(findings: Findings) -> NetworkInputs:
    """The networks' inputs from ``findings`` (which has them all: ``missing_inputs`` is empty)."""
    maps = findings.maps
    if MODALITIES.get(findings.analysis) == "ct":
        volumes = {"cbf": maps[MapName.CBF], "cbv": maps[MapName.CBV], "ttp": maps[MapName.TTP], "tmax": maps[MapName.TMAX],
                   "mip": findings.mip}
        return NetworkInputs("ct", volumes, np.asarray(findings.brain, dtype=bool))
    volumes = {"dwi": findings.dwi, "adc": maps[MapName.ADC], "tmax": maps[MapName.TMAX], "cbf": maps[MapName.CBF], "cbv": maps[MapName.CBV]}
    return NetworkInputs("mri", volumes, np.asarray(maps[MapName.ADC]) > 0)


def add_final_infarct(findings: Findings, models: ModelSet) -> Findings:
    """``findings`` with both predicted final infarcts, or with a QC flag saying why not."""
    missing = missing_inputs(findings)
    if missing:
        return replace(findings, qc_flags=[*findings.qc_flags, f"no predicted final infarct: the study lacks {', '.join(missing)}"])
    inputs = network_inputs(findings)
    measured = findings.segment(SegmentKind.CORE)
    core = None if measured is None else measured.mask
    masks: dict[Scenario, np.ndarray] = {}
    identities: dict[Scenario, ModelInfo] = {}
    notes: set[str] = set()
    try:
        for scenario in Scenario:
            with models.use(model_name(inputs.modality, scenario), contract(inputs.modality, scenario)) as engine:
                found = predict_final_infarct(engine, inputs.volumes, inputs.brain, findings.geometry.spacing)
                masks[scenario], identities[scenario] = including_core(found.mask, core), engine.identity
                if found.resampled_from_mm is not None:
                    rows, columns = found.resampled_from_mm
                    notes.add(f"predicted final infarct on pixels resampled from {rows:.2f} x {columns:.2f} mm to "
                              f"{trained_pixel_mm(engine.card):.2f} mm (the networks' training size)")
    except (ModelError, InputError) as error:
        return replace(findings, qc_flags=[*findings.qc_flags, f"no predicted final infarct: {error}"])
    voxel_ml = findings.geometry.voxel_volume_ml
    comparison = compare_scenarios(masks[Scenario.REPERFUSED], masks[Scenario.NOT_REPERFUSED], voxel_ml)
    segments = [Segment(SEGMENT_KINDS[s], s.label, masks[s], float(masks[s].sum()) * voxel_ml, model=identities[s]) for s in Scenario]
    return replace(
        findings,
        segments=[*findings.segments, *segments],
        measurements={**findings.measurements, **comparison.measurements()},
        models=[*findings.models, *identities.values()],
        qc_flags=[*findings.qc_flags, *sorted(notes)],
    )
