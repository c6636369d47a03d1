"""The 90-day outcome added to an MRI study's Findings: the maps and masks the analysis made, the
patient's age and sex from the images' header and the NIHSS the study uses go to seed 004's CRD
model (``outcome_model``) and to seed 000's CNN-LSTM modules fused by Algorithm 1
(``outcome_cnn_lstm``); the Findings gain each model's record, or a QC flag saying why not.

The model was trained on MRI maps (ADC, DWI, Tmax, CBF, CBV); CT studies get no outcome and say so.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from service.analysis.outcome_cnn_lstm import DEFAULT_FUSION_CARD, cnn_lstm_model
from service.analysis.outcome_model import DEFAULT_CARD, OutcomeInputs, outcome_model, to_record
from service.errors import InputError, ModelError
from service.findings import Analysis, Findings, MapName, NihssUsed, SegmentKind

_AGE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
MRI_ANALYSES = (Analysis.MRI_MISMATCH,)
NOT_FOR_CT = "90-day outcome not computed: the outcome model takes MRI maps (ADC, DWI, Tmax, CBF, CBV), not CT"


def patient_age_sex(header: Dataset) -> tuple[float, bool] | None:
    """(age in years, female) from Patient's Age ("072Y") and Patient's Sex ("F"/"M"); None when
    either is missing or not in DICOM's form."""
    match = _AGE.match(str(header.get("PatientAge", "") or "").strip())
    sex = str(header.get("PatientSex", "") or "").strip().upper()
    if match is None or sex not in ("F", "M"):
        return None
    return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)], sex == "F"


def outcome_inputs(findings: Findings, nihss: NihssUsed | None) -> OutcomeInputs | str:
    """The model's inputs from ``findings``, or the reason (a QC flag) there are none."""
    if findings.analysis not in MRI_ANALYSES:
        if findings.analysis in (Analysis.CT_PERFUSION, Analysis.VENDOR_MAPS):
            return NOT_FOR_CT
        return "90-day outcome not computed: it needs DSC perfusion maps (Tmax, CBF, CBV) beside the diffusion"
    maps = {MapName.ADC: "adc", MapName.TMAX: "tmax", MapName.CBF: "cbf", MapName.CBV: "cbv"}
    missing = [name.title for name in maps if name not in findings.maps] + (["DWI"] if findings.dwi is None else [])
    if missing:
        return f"90-day outcome not computed: no {', '.join(missing)} on the diffusion grid"
    demographics = patient_age_sex(findings.source_images[0]) if findings.source_images else None
    if demographics is None:
        return "90-day outcome not computed: the images carry no Patient's Age and Sex"
    core, penumbra = findings.segment(SegmentKind.CORE), findings.segment(SegmentKind.PENUMBRA)
    core_mask = core.mask if core is not None else np.zeros(findings.geometry.shape, dtype=bool)
    hypoperfused = core_mask | (penumbra.mask if penumbra is not None else False)
    values = {key: findings.maps[name] for name, key in maps.items()}
    values["dwi"] = findings.dwi
    brain = findings.maps[MapName.ADC] > 0  # the ADC map is zero outside the intracranial mask
    return OutcomeInputs(values, brain, core_mask, hypoperfused, findings.geometry.spacing,
                         demographics[0], demographics[1], nihss)


def add_outcome(findings: Findings, nihss: NihssUsed | None, card_path: Path = DEFAULT_CARD,
                fusion_card_path: Path | None = None) -> Findings:
    """``findings`` with its outcomes (P(mRS 3-6 at 90 days) of each model, the NIHSS used or imaging
    only), or with a QC flag per model naming why there is none. The imaging results never depend
    on them. ``fusion_card_path``: seed 000's card, by default beside ``card_path``."""
    inputs = outcome_inputs(findings, nihss)
    if isinstance(inputs, str):
        return replace(findings, qc_flags=[*findings.qc_flags, inputs])
    fusion_card_path = fusion_card_path or card_path.parent / DEFAULT_FUSION_CARD.name
    try:
        prediction = outcome_model(card_path).predict(inputs)
        findings = replace(findings, outcome=to_record(prediction, inputs.age, inputs.sex_female),
                           models=[*findings.models, prediction.model])
    except (InputError, ModelError) as error:
        findings = replace(findings, qc_flags=[*findings.qc_flags, f"90-day outcome not computed: {error}"])
    try:
        fused = cnn_lstm_model(fusion_card_path).predict(inputs)
        findings = replace(findings, outcome_cnn_lstm=fused, models=[*findings.models, fused.model])
    except (InputError, ModelError) as error:
        findings = replace(findings, qc_flags=[*findings.qc_flags, f"90-day outcome (CNN-LSTM) not computed: {error}"])
    return findings
