"""The 90-day outcomes in the results: the Findings' records (seed 004's CRD, seed 000's CNN-LSTM
fusion), their recompute from what was stored when a later NIHSS arrives, the SR's NUM per model
with the model and the inputs it used, the summary's lines and the revised summary image."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import numpy as np
import pytest
from pydicom.dataset import Dataset

from service.analysis.outcome_findings import NOT_FOR_CT, add_outcome, patient_age_sex
from service.findings import NIHSS_NOT_AVAILABLE, Analysis, FusionOutcomeRecord, ModelInfo, NihssSource, NihssUsed, OutcomeRecord
from service.results.seg import build_seg
from service.results.sr import build_sr, clinical_input, reported_outcomes, revise_sr
from service.results.summary import build_summary, outcome_line, revise_summary, text_lines
from test_clinical_report import HL7_14, HL7_22
from test_outcome_models import _mri_study
from test_results import make_findings, patient, write_and_read  # noqa: F401 - the fixture too

MODEL = ModelInfo("outcome-crd", "1.0.0", "ab" * 32, "onnxruntime (CPUExecutionProvider)")


FUSION = ModelInfo("outcome-cnn-lstm", "1.0.0", "cd" * 32, "onnxruntime (CPUExecutionProvider)")
MODULES = (("adc", 0.7), ("dwi", 0.6), ("tmax", 0.8), ("cbf", 0.3), ("cbv", 0.2))


def _record(probability: float, nihss: NihssUsed | None) -> OutcomeRecord:
    return OutcomeRecord(probability, MODEL, nihss, radiomics=0.4, deep=1.2, age=72.0, sex_female=True)


def _fused(probability: float, nihss: NihssUsed | None) -> FusionOutcomeRecord:
    return FusionOutcomeRecord(probability, FUSION, nihss, MODULES)


def test_recompute_from_the_stored_components_equals_a_fresh_prediction_with_that_nihss() -> None:
    pytest.importorskip("onnxruntime")
    from service.analysis.outcome_model import outcome_card, outcome_model, recompute, to_record

    model = outcome_model()
    first = to_record(model.predict(_mri_study(10, 14)), 72.0, True)
    stored = OutcomeRecord.from_summary(first.summary(), None)  # what the database keeps
    for nihss in (22, None):
        study = _mri_study(10, nihss)
        fresh = model.predict(study)
        again = recompute(outcome_card(), stored, study.nihss)
        assert again.probability == pytest.approx(fresh.probability, abs=1e-9)
        assert again.nihss == study.nihss and again.model == model.info
    assert recompute(outcome_card(), stored, _mri_study(10, 22).nihss).probability > first.probability


def test_recompute_refuses_another_models_record() -> None:
    from service.analysis.outcome_model import outcome_card, recompute
    from service.errors import ModelError

    other = dataclasses.replace(_record(0.5, None), model=dataclasses.replace(MODEL, version="0.0.1"))
    with pytest.raises(ModelError, match="0.0.1"):
        recompute(outcome_card(), other, HL7_14)


def test_the_record_says_imaging_only_without_nihss_and_round_trips() -> None:
    blind = _record(0.31, None)
    assert blind.inputs_used.startswith(NIHSS_NOT_AVAILABLE)
    assert blind.summary()["nihss"] == {"available": False, "note": NIHSS_NOT_AVAILABLE}
    named = _record(0.62, HL7_14)
    assert named.summary()["probability_mrs_3_6_90d"] == 0.62 and "NIHSS 14" in named.inputs_used
    back = OutcomeRecord.from_summary(named.summary(), HL7_14)
    assert back == named


def test_the_sr_carries_the_probability_with_its_model_and_inputs(patient) -> None:  # noqa: F811
    findings = dataclasses.replace(make_findings(patient), nihss=HL7_14, outcome=_record(0.62, HL7_14))
    report = write_and_read(build_sr(findings, build_seg(findings)))
    items = clinical_input(report)
    assert items["POORMRS90D"] == (0.62, "{probability}") and items["72089-6"] == (14.0, "{score}")
    assert items["OUTCOMEINPUTS"].startswith("outcome-crd 1.0.0: NIHSS 14 (HL7 v2 ORU^R01")
    texts = [i.TextValue for i in _walk(report.ContentSequence) if i.ValueType == "TEXT"]
    assert "outcome-crd" in texts  # the NUM's algorithm identification

    revised = write_and_read(revise_sr(report, report.StudyInstanceUID, 1, 2, HL7_22, [_record(0.81, HL7_22)]))
    assert clinical_input(revised)["POORMRS90D"] == (0.81, "{probability}")
    assert "NIHSS 22" in clinical_input(revised)["OUTCOMEINPUTS"]


def test_without_nihss_the_sr_outcome_says_imaging_only(patient) -> None:  # noqa: F811
    findings = dataclasses.replace(make_findings(patient), outcome=_record(0.3, None))
    items = clinical_input(write_and_read(build_sr(findings, build_seg(findings))))
    assert items["POORMRS90D"] == (0.3, "{probability}") and "72089-6" not in items
    assert NIHSS_NOT_AVAILABLE in items["OUTCOMEINPUTS"]


def test_an_outcome_of_another_nihss_is_refused(patient) -> None:  # noqa: F811
    findings = dataclasses.replace(make_findings(patient), nihss=HL7_22, outcome=_record(0.6, HL7_14))
    with pytest.raises(ValueError, match="another NIHSS"):
        build_sr(findings, build_seg(findings))


def test_summary_line_names_probability_and_nihss(patient) -> None:  # noqa: F811
    assert outcome_line(_record(0.623, HL7_14)) == "P(mRS 3-6 at 90 d) 62% CRD: NIHSS 14, HL7 v2 ORU^R01"
    assert outcome_line(_record(0.2, None)) == "P(mRS 3-6 at 90 d) 20% CRD: no NIHSS, imaging only"
    assert outcome_line(_fused(0.55, HL7_14)) == "P(mRS 3-6 at 90 d) 55% CNN-LSTM: NIHSS 14, HL7 v2 ORU^R01"
    base = make_findings(patient)
    findings = dataclasses.replace(base, nihss=HL7_14, outcome=_record(0.623, HL7_14), outcome_cnn_lstm=_fused(0.55, HL7_14),
                                   maps={"adc": np.full(base.geometry.shape, 800.0, dtype=np.float32)})
    assert outcome_line(findings.outcome) in text_lines(findings)
    assert outcome_line(findings.outcome_cnn_lstm) in text_lines(findings)
    assert not any(line.startswith("P(mRS") for line in text_lines(make_findings(patient)))
    build_summary(findings)  # the image draws with the extra line


def test_ct_studies_get_no_outcome_and_say_why(patient) -> None:  # noqa: F811
    findings = dataclasses.replace(make_findings(patient), analysis=Analysis.CT_PERFUSION)
    added = add_outcome(findings, HL7_14)
    assert added.outcome is None and NOT_FOR_CT in added.qc_flags


def test_patient_age_and_sex_from_the_header() -> None:
    header = Dataset()
    header.PatientAge, header.PatientSex = "072Y", "F"
    assert patient_age_sex(header) == (72.0, True)
    header.PatientAge = "7Y"
    assert patient_age_sex(header) is None


def _walk(items):  # noqa: ANN001, ANN202
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def test_a_revision_recomputes_the_stored_outcome_or_names_none() -> None:
    from service.analysis.clinical_revision import revised_outcome
    from service.analysis.outcome_model import outcome_card

    card = outcome_card()
    stored = dataclasses.replace(_record(0.5, HL7_14), model=dataclasses.replace(MODEL, name=card.name, version=card.version))
    findings = {"outcome": stored.summary()}
    mild, severe = revised_outcome(findings, HL7_14), revised_outcome(findings, HL7_22)
    assert mild.nihss == HL7_14 and severe.nihss == HL7_22 and severe.probability > mild.probability
    assert revised_outcome({"outcome": None}, HL7_22) is None and revised_outcome(None, HL7_22) is None
    assert revised_outcome({"outcome": {"components": {}}}, HL7_22) is None  # a damaged record: no stale number


def test_the_sr_carries_each_models_probability_and_a_revision_both(patient) -> None:  # noqa: F811
    findings = dataclasses.replace(make_findings(patient), nihss=HL7_14, outcome=_record(0.62, HL7_14),
                                   outcome_cnn_lstm=_fused(0.55, HL7_14))
    report = write_and_read(build_sr(findings, build_seg(findings)))
    reported = reported_outcomes(report)
    assert set(reported) == {"outcome-crd", "outcome-cnn-lstm"}
    assert reported["outcome-crd"][0] == 0.62 and reported["outcome-cnn-lstm"][0] == 0.55
    assert reported["outcome-cnn-lstm"][1].startswith("outcome-cnn-lstm 1.0.0: NIHSS 14 (HL7 v2 ORU^R01")
    assert "CNN-LSTM modules on ADC, DWI, Tmax, CBF, CBV" in reported["outcome-cnn-lstm"][1]
    assert clinical_input(report)["POORMRS90D"] == (0.62, "{probability}")  # the first model's, as before

    revised = write_and_read(revise_sr(report, report.StudyInstanceUID, 1, 2, HL7_22,
                                       [_record(0.81, HL7_22), _fused(0.66, HL7_22)]))
    again = reported_outcomes(revised)
    assert again["outcome-crd"][0] == 0.81 and again["outcome-cnn-lstm"][0] == 0.66
    assert "NIHSS 22" in again["outcome-cnn-lstm"][1]
    with pytest.raises(ValueError, match="another NIHSS"):
        revise_sr(report, report.StudyInstanceUID, 1, 3, HL7_22, [_record(0.81, HL7_22), _fused(0.66, HL7_14)])


def test_the_fusion_record_round_trips_and_a_revision_refuses_it_damaged() -> None:
    named = _fused(0.55, HL7_14)
    assert FusionOutcomeRecord.from_summary(named.summary(), HL7_14) == named
    blind = _fused(0.4, None)
    assert blind.inputs_used.startswith(NIHSS_NOT_AVAILABLE)
    with pytest.raises(ValueError, match="no module"):
        FusionOutcomeRecord.from_summary({**named.summary(), "modules": {}}, None)


def test_a_revised_summary_keeps_the_montage_and_redraws_the_outcome(patient) -> None:  # noqa: F811
    base = make_findings(patient)
    findings = dataclasses.replace(base, nihss=HL7_14, outcome=_record(0.62, HL7_14), outcome_cnn_lstm=_fused(0.55, HL7_14),
                                   maps={"adc": np.full(base.geometry.shape, 800.0, dtype=np.float32)})
    first = write_and_read(build_summary(findings))
    revised = write_and_read(revise_summary(first, findings.study_uid, 1, 2, HL7_22, [_record(0.81, HL7_22), _fused(0.66, HL7_22)],
                                            ["Core: 12.0 mL"], []))
    before, after = first.pixel_array, revised.pixel_array
    assert after.shape == before.shape
    left = int(before.shape[1] * 0.6)
    np.testing.assert_array_equal(after[:, :left], before[:, :left])  # the montage: the imaging, unchanged
    assert (after[:, left:] != before[:, left:]).any()  # the text column: the new NIHSS and outcomes
    assert revised.SOPInstanceUID != first.SOPInstanceUID and revised.SeriesInstanceUID == first.SeriesInstanceUID
    assert revised.InstanceNumber == 2
    with pytest.raises(ValueError, match="revision 1"):
        revise_summary(first, findings.study_uid, 1, 1, HL7_22, [], [], [])
