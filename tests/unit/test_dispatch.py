"""Which analysis a study gets (pipeline.dispatch), the thresholds reaching it, and the SR that
reports it: read back with highdicom, every value equals the Findings."""

from __future__ import annotations

import dataclasses
import shutil
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from service.analysis.final_infarct_model import ScenarioComparison
from service.findings import CoreMethod, Findings, SegmentKind
from service.analysis.pipeline import AnalysisParameters, analyse_study, dispatch, study_series
from service.config import Settings
from service.analysis.ctp_model import MODEL_NAME
from service.errors import InputError, ModelError
from service.inference.ctp_inputs import CTP_CONTRACT
from service.inference.engine import Backend
from service.inference.model_set import ModelSet
from service.perfusion.thresholds import Defuse3Criteria
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.results.coding import MEASUREMENT_CODES, QC_FLAG, TARGET_MISMATCH
from service.results.seg import build_seg
from service.results.sr import build_sr

DEFAULTS = AnalysisParameters.from_settings(Settings())
SMALL = PhantomOptions(ct_matrix=96, ct_slices=8, ct_frames=16, noise_hu=0.0, mr_matrix=64, mr_slices=10, mr_snr=40.0)


@pytest.fixture(scope="module")
def small_mri(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MRI patient 2 (DWI, ADC, FLAIR, DSC-PWI) on a 64 x 64 x 10 grid."""
    out = tmp_path_factory.mktemp("mri")
    write_patient(2, "mri", out, SMALL)
    return out / "SGPH00000002" / "dicom" / "MR"


@pytest.fixture(scope="module")
def small_maps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Vendor perfusion maps (CBF, CBV, MTT, TTP, Tmax) of patient 2 on a 96 x 96 x 8 grid."""
    out = tmp_path_factory.mktemp("maps")
    write_patient(2, "maps", out, SMALL)
    return out / "SGPH00000002" / "dicom" / "CT"


def files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.dcm"))


@pytest.fixture(scope="module")
def mismatch(small_mri: Path) -> Findings:
    return dispatch(study_series(files(small_mri)), 1, DEFAULTS, None)


def test_series_are_classified(small_mri: Path) -> None:
    series = study_series(files(small_mri))
    assert {kind: len(s) for kind, s in series.by_kind.items()} == {"dwi": 1, "adc": 1, "flair": 1, "pwi": 1}
    assert series.files("pwi") and all(name.endswith(".dcm") for name in series.files("pwi"))


def test_dwi_alone_gives_the_diffusion_core(small_mri: Path) -> None:
    findings = dispatch(study_series(files(small_mri / "dwi")), 1, DEFAULTS, None)
    assert findings.analysis == "mri-diffusion-core"
    assert [s.key for s in findings.segments] == ["core"]
    assert findings.measurements["core_volume_ml"] > 1


def test_dwi_and_pwi_give_the_mismatch(mismatch: Findings) -> None:
    m = mismatch.measurements
    assert mismatch.analysis == "mri-perfusion-diffusion-mismatch"
    # with seed 001's networks, on 3.6 mm pixels resampled to their 1.8 mm (and a flag saying so)
    assert [s.key for s in mismatch.segments] == ["core", "penumbra", "final_reperfused", "final_not_reperfused"]
    assert any(flag.startswith("predicted final infarct on pixels resampled from 3.59 x 3.59 mm") for flag in mismatch.qc_flags)
    assert m["hypoperfused_volume_ml"] > m["core_volume_ml"] > 1
    assert m["mismatch_volume_ml"] == pytest.approx(m["hypoperfused_volume_ml"] - m["core_volume_ml"])
    assert m["mismatch_ratio"] == pytest.approx(m["hypoperfused_volume_ml"] / m["core_volume_ml"])
    assert 0 <= m["hypoperfusion_intensity_ratio"] <= 1
    assert m["target_mismatch"] == float(Defuse3Criteria().is_target(m["core_volume_ml"], m["hypoperfused_volume_ml"]))
    core, penumbra = (s.mask for s in mismatch.segments[:2])
    assert not (core & penumbra).any()
    assert {"cbf", "cbv", "mtt", "ttp", "tmax"} <= set(mismatch.maps)  # each becomes a colour and a value series
    ttp = mismatch.maps["ttp"]  # s after the first frame: the bolus peaks later in the hypoperfused tissue
    assert np.median(ttp[penumbra & (ttp > 0)]) > np.median(ttp[~core & ~penumbra & (ttp > 0)]) + 2.0
    assert mismatch.parameters["tmax_threshold_s"] == 6.0 and mismatch.parameters["adc_threshold"] == 620.0


def test_thresholds_reach_the_mri_analysis(small_mri: Path, mismatch: Findings) -> None:
    strict = dataclasses.replace(DEFAULTS, tmax_threshold_s=8.0, criteria=Defuse3Criteria(max_core_ml=1.0))
    findings = dispatch(study_series(files(small_mri)), 1, strict, None)
    assert findings.measurements["hypoperfused_volume_ml"] < mismatch.measurements["hypoperfused_volume_ml"]
    assert findings.measurements["target_mismatch"] == 0.0
    assert findings.parameters["tmax_threshold_s"] == 8.0 and findings.parameters["max_core_ml"] == 1.0


def test_a_dsc_series_that_cannot_be_analysed_leaves_the_core_with_a_flag(small_mri: Path, tmp_path: Path) -> None:
    shutil.copytree(small_mri / "dwi", tmp_path / "dwi")
    (tmp_path / "pwi").mkdir()
    for path in files(small_mri / "pwi"):
        ds = pydicom.dcmread(path)
        del ds.EchoTime
        ds.save_as(tmp_path / "pwi" / path.name)
    findings = dispatch(study_series(files(tmp_path / "dwi", tmp_path / "pwi")), 1, DEFAULTS, None)
    assert findings.analysis == "mri-diffusion-core"
    assert [f for f in findings.qc_flags if f.startswith("DSC perfusion not analysed:") and "EchoTime" in f]


def test_ctp_gives_ct_perfusion_with_the_configured_verdict(small_ctp: Path) -> None:
    ctp = study_series(files(small_ctp / "dicom" / "CT" / "ctp"))
    findings = dispatch(ctp, 3, DEFAULTS, None)
    assert findings.analysis == "ct-perfusion" and findings.version == 3
    m = findings.measurements
    assert m["target_mismatch"] == float(Defuse3Criteria().is_target(m["core_volume_ml"], m["hypoperfused_volume_ml"]))
    never = dispatch(ctp, 3, dataclasses.replace(DEFAULTS, criteria=Defuse3Criteria(min_mismatch_ml=1e6), tmax_threshold_s=5.0), None)
    assert never.measurements["target_mismatch"] == 0.0 and never.parameters["min_mismatch_ml"] == 1e6
    tmax = never.maps["tmax"]  # the HIR's denominator follows the configured hypoperfusion threshold
    assert (tmax > 5.0).sum() > (tmax > 6.0).sum() > 0
    assert never.measurements["hypoperfusion_intensity_ratio"] == pytest.approx((tmax > 10).sum() / (tmax > 5.0).sum(), rel=1e-6)
    assert [s.key for s in findings.segments][0] == "core"


@pytest.fixture(scope="module")
def model_sized_ctp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CT perfusion study at the pixel size the CT model was trained on (256 x 256), few slices."""
    out = tmp_path_factory.mktemp("ctp-256")
    write_patient(2, "ctp", out, PhantomOptions(ct_slices=4, ct_frames=24, noise_hu=5.0))
    return out / "SGPH00000002" / "dicom" / "CT" / "ctp"


def test_the_ct_model_adds_its_segments_and_gives_the_verdict_when_asked(model_sized_ctp: Path) -> None:
    ctp = study_series(files(model_sized_ctp))
    by_model = dataclasses.replace(DEFAULTS, ctp_core_method=CoreMethod.MODEL)
    findings = dispatch(ctp, 1, by_model, None, nihss=14)
    labels = [s.label for s in findings.segments]
    assert {"Ischemic core", "Ischemic core (model)", "Penumbra (model)"} <= set(labels)
    assert findings.core_method is CoreMethod.MODEL
    assert [m.name for m in findings.models] == ["ctp-core-penumbra", "ct-final-infarct-reperfused", "ct-final-infarct-not-reperfused"]
    model_core = next(s for s in findings.segments if s.label == "Ischemic core (model)")
    assert findings.measurements["core_volume_ml"] == model_core.volume_ml
    assert any("NIHSS 14 given" in flag for flag in findings.qc_flags)
    sr = sr_back(findings)  # the SR encodes the model's volumes as the verdict's
    assert {str(g.tracking_identifier) for g in sr.content.get_volumetric_roi_measurement_groups()} >= {"Ischemic core (model)"}


def test_a_model_that_cannot_run_leaves_the_threshold_results_with_the_reason(model_sized_ctp: Path, tmp_path: Path) -> None:
    ctp = study_series(files(model_sized_ctp))
    missing = dataclasses.replace(DEFAULTS, ctp_core_method=CoreMethod.MODEL, models=ModelSet(tmp_path))
    findings = dispatch(ctp, 1, missing, None)
    assert [s.model for s in findings.segments] == [None] * len(findings.segments)
    assert findings.core_method is CoreMethod.THRESHOLD and findings.models == []
    assert any(f.startswith("CT perfusion model not run: model ctp-core-penumbra is not installed") for f in findings.qc_flags)
    assert "core and penumbra by the threshold method: the model did not run" in findings.qc_flags
    threshold_core = next(s for s in findings.segments if s.label == "Ischemic core")
    assert findings.measurements["core_volume_ml"] == threshold_core.volume_ml


def test_a_tampered_model_file_is_refused_each_time_it_is_asked_for(tmp_path: Path) -> None:
    for name in ("ctp-core-penumbra.onnx", "ctp-core-penumbra.card.json"):
        shutil.copy(DEFAULTS.models.folder / name, tmp_path / name)
    with open(tmp_path / "ctp-core-penumbra.onnx", "ab") as handle:
        handle.write(b"tampered")
    models = ModelSet(tmp_path)
    for _ in range(2):
        with pytest.raises(ModelError, match="sha256"):
            with models.use(MODEL_NAME, CTP_CONTRACT):
                pass


def test_vendor_maps_give_core_and_penumbra(small_maps: Path) -> None:
    findings = dispatch(study_series(files(small_maps)), 1, DEFAULTS, None)
    assert findings.analysis == "vendor-perfusion-maps"
    assert [s.key for s in findings.segments] == ["core", "penumbra"]
    m = findings.measurements
    assert m["hypoperfused_volume_ml"] > m["core_volume_ml"] > 1
    assert findings.source_images[0].SeriesDescription.startswith("CBF")


def test_vendor_maps_without_tmax_are_refused(small_maps: Path) -> None:
    with pytest.raises(InputError, match="without TMAX"):
        dispatch(study_series(files(small_maps / "cbf", small_maps / "cbv")), 1, DEFAULTS, None)


def test_a_study_with_nothing_to_analyse_is_refused_with_what_it_holds(small_mri: Path) -> None:
    with pytest.raises(InputError, match=r"nothing to analyse.*1 flair"):
        analyse_study(files(small_mri / "flair"), 1, DEFAULTS)
    with pytest.raises(InputError, match="no instances"):
        analyse_study([], 1, DEFAULTS)


def test_parameters_come_from_the_settings(tmp_path: Path) -> None:
    defaults = Settings()
    assert AnalysisParameters.from_settings(defaults) == AnalysisParameters(
        adc_threshold=620, min_lesion_ml=0.3, core_rcbf=0.3, tmax_threshold_s=6, vessel_cbv=8, anatomy_detail=True,
        criteria=Defuse3Criteria(70, 1.8, 15), ctp_core_method=CoreMethod.THRESHOLD,
        models=ModelSet(defaults.models_dir, Backend.AUTO, defaults.engine_cache_dir),
    )
    settings = Settings(core_rcbf_threshold=0.2, tmax_threshold_s=8, target_max_core_ml=50,
                        target_min_mismatch_ratio=2, target_min_mismatch_ml=10, adc_core_threshold=600,
                        vessel_cbv_threshold=10, ctp_anatomy_detail=False, ctp_core_method="model",
                        models_dir=tmp_path, inference_backend="onnxruntime")
    assert AnalysisParameters.from_settings(settings) == AnalysisParameters(
        adc_threshold=600, min_lesion_ml=0.3, core_rcbf=0.2, tmax_threshold_s=8, vessel_cbv=10, anatomy_detail=False,
        criteria=Defuse3Criteria(50, 2, 10), ctp_core_method=CoreMethod.MODEL,
        models=ModelSet(tmp_path, Backend.ONNXRUNTIME, defaults.engine_cache_dir),
    )
    assert AnalysisParameters.from_settings(Settings(learned_models=False)).models is None
    with pytest.raises(ValueError):
        Settings(tmax_threshold_s=12)  # must stay below the 10 s of the HIR numerator


# ------------------------------------------------------------------ SR content


def sr_back(findings: Findings) -> hd.sr.Comprehensive3DSR:
    seg = build_seg(findings)
    with BytesIO() as fp:
        build_sr(findings, seg).save_as(fp, enforce_file_format=True)
        return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(BytesIO(fp.getvalue())))


def test_sr_carries_every_measurement_the_verdict_and_the_flags(mismatch: Findings) -> None:
    thresholds = [s for s in mismatch.segments if s.key in (SegmentKind.CORE, SegmentKind.PENUMBRA)]
    measured = {k: v for k, v in mismatch.measurements.items() if k not in ScenarioComparison(0, 0, 0, False).measurements()}
    findings = Findings(**{**mismatch.__dict__, "segments": thresholds, "measurements": measured,  # the mismatch alone
                           "qc_flags": ["low AIF peak", "motion corrected (up to 2.5 mm)"]})
    back = sr_back(findings)
    groups = back.content.get_volumetric_roi_measurement_groups()
    volumes = {g.tracking_identifier: g.get_measurements(name=codes.SCT.Volume)[0] for g in groups}
    assert set(volumes) == {"Ischemic core", "Penumbra"}
    for segment in findings.segments:
        assert volumes[segment.label].value == pytest.approx(segment.volume_ml, rel=1e-6)
        assert volumes[segment.label].unit.value == "ml" and volumes[segment.label].unit.scheme_designator == "UCUM"
    study, _clinical = back.content.get_image_measurement_groups()  # the second names the NIHSS
    reported = {m.name.value: m for m in study.get_measurements()}
    expected = {name: value for name, value in findings.measurements.items()
                if name not in ("core_volume_ml", "penumbra_volume_ml", "target_mismatch")}
    assert set(reported) == {MEASUREMENT_CODES[name].value for name in expected}
    for name, value in expected.items():
        measurement = reported[MEASUREMENT_CODES[name].value]
        assert measurement.value == pytest.approx(value, rel=1e-6)
        assert measurement.unit.scheme_designator == "UCUM"
        assert measurement.unit.value == ("ml" if name.endswith("_ml") else "{ratio}")
    (verdict,) = [e for e in study.get_qualitative_evaluations() if e.name == TARGET_MISMATCH]
    assert verdict.value == (codes.SCT.Yes if findings.measurements["target_mismatch"] == 1.0 else codes.SCT.No)
    flags = [item.TextValue for item in study[0].ContentSequence
             if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == QC_FLAG.value]
    assert flags == findings.qc_flags


def test_sr_verdict_no_when_the_profile_is_not_met(mismatch: Findings) -> None:
    findings = Findings(**{**mismatch.__dict__, "measurements": {**mismatch.measurements, "target_mismatch": 0.0}})
    study, _clinical = sr_back(findings).content.get_image_measurement_groups()
    (verdict,) = [e for e in study.get_qualitative_evaluations() if e.name == TARGET_MISMATCH]
    assert verdict.value == codes.SCT.No
