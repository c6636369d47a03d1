"""Seed 001's predicted final infarcts in the results: the responder verdict, the QC flag when a
study lacks what the networks need, and both predictions in the SEG, the SR and the summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.analysis.final_infarct_model import add_final_infarct, compare_scenarios
from service.findings import Findings, MapName, Measurement, ModelInfo, Segment, SegmentKind
from service.imaging.geometry import Geometry
from service.inference.engine import Backend
from service.inference.model_set import ModelSet
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.phantom.truth_files import read_nifti
from service.results.coding import FINAL_IF_NOT_REPERFUSED, FINAL_IF_REPERFUSED
from service.results.seg import build_seg
from service.results.sr import build_sr
from service.results.summary import SCENARIO_COLOURS, render_summary, text_lines

WEIGHTS = Path(__file__).parents[2] / "models" / "weights"
MODEL = ModelInfo("mri-final-infarct-reperfused", "0.1.0", "0" * 64, "onnxruntime (CPUExecutionProvider)")


def test_a_responder_has_two_different_predictions_and_a_larger_one_without_reperfusion() -> None:
    small = np.zeros((2, 10, 10), dtype=bool)
    small[0, :2, :2] = True  # 4 voxels
    large = small.copy()
    large[1] = True  # 104 voxels
    verdict = compare_scenarios(small, large, voxel_ml=0.5)
    assert verdict.responder and verdict.salvage_ml == pytest.approx(50.0) and verdict.dice < 0.5
    same = compare_scenarios(large, large, voxel_ml=0.5)
    assert not same.responder and same.dice == 1.0 and same.salvage_ml == 0.0
    nothing = compare_scenarios(np.zeros_like(small), np.zeros_like(small), voxel_ml=0.5)
    assert not nothing.responder
    assert set(verdict.measurements()) == {Measurement.FINAL_IF_REPERFUSED_VOLUME, Measurement.FINAL_IF_NOT_REPERFUSED_VOLUME,
                                          Measurement.REPERFUSION_SALVAGE, Measurement.SCENARIO_DICE, Measurement.RESPONDER}


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> Findings:
    """MRI Findings made of a small phantom's truth: core, penumbra and both final infarcts."""
    out = tmp_path_factory.mktemp("final")
    write_patient(2, "mri", out, PhantomOptions(mr_matrix=64, mr_slices=8, mr_frames=6))
    root = out / "SGPH00000002"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((root / "dicom/MR/adc").glob("*.dcm"))]
    headers.sort(key=lambda h: float(h.ImagePositionPatient[2]))
    geometry = Geometry((8, 64, 64), (6.0, 230 / 64, 230 / 64), tuple(map(float, headers[0].ImagePositionPatient)))

    def truth(name: str) -> np.ndarray:
        return read_nifti(root / "truth" / "mr" / f"{name}.nii.gz")[0]

    masks = {name: truth(name).astype(bool) for name in ("core", "penumbra", "final_reperfused", "final_not_reperfused")}
    voxel = geometry.voxel_volume_ml
    comparison = compare_scenarios(masks["final_reperfused"], masks["final_not_reperfused"], voxel)
    other = dataclasses.replace(MODEL, name="mri-final-infarct-not-reperfused")
    return Findings(
        study_uid=str(headers[0].StudyInstanceUID), version=1, analysis="mri-perfusion-diffusion-mismatch", geometry=geometry, source_images=headers,
        segments=[Segment("core", "Ischemic core", masks["core"], float(masks["core"].sum()) * voxel),
                  Segment("penumbra", "Penumbra", masks["penumbra"], float(masks["penumbra"].sum()) * voxel),
                  Segment(SegmentKind.FINAL_IF_REPERFUSED, "Predicted final infarct if reperfused", masks["final_reperfused"],
                          comparison.reperfused_ml, model=MODEL),
                  Segment(SegmentKind.FINAL_IF_NOT_REPERFUSED, "Predicted final infarct if not reperfused", masks["final_not_reperfused"],
                          comparison.not_reperfused_ml, model=other)],
        measurements={"core_volume_ml": float(masks["core"].sum()) * voxel, **comparison.measurements()},
        maps={"adc": np.where(truth("adc") > 0, truth("adc"), 0).astype(np.float32)}, models=[MODEL, other],
    )


def test_a_study_without_perfusion_gets_no_prediction_and_a_flag_saying_why(findings: Findings, tmp_path: Path) -> None:
    bare = dataclasses.replace(findings, segments=findings.segments[:1], maps={MapName.ADC: findings.maps[MapName.ADC]},
                               measurements={}, qc_flags=[], dwi=None)
    out = add_final_infarct(bare, ModelSet(tmp_path))
    assert [s.key for s in out.segments] == [SegmentKind.CORE]
    assert len(out.qc_flags) == 1 and "no predicted final infarct" in out.qc_flags[0]
    assert "Tmax" in out.qc_flags[0] and "DWI" in out.qc_flags[0]


def test_a_study_whose_networks_are_not_installed_gets_a_flag(findings: Findings, tmp_path: Path) -> None:
    shape = findings.geometry.shape
    full = dataclasses.replace(findings, segments=findings.segments[:2], qc_flags=[], dwi=np.ones(shape, dtype=np.float32),
                               maps={**findings.maps, **{m: np.ones(shape, dtype=np.float32) for m in (MapName.TMAX, MapName.CBF, MapName.CBV)}})
    out = add_final_infarct(full, ModelSet(tmp_path))
    assert len(out.segments) == 2
    assert "not installed" in out.qc_flags[0]


def test_both_predictions_are_seg_segments_and_sr_measurements(findings: Findings) -> None:
    seg = build_seg(findings)
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels[2:] == ["Predicted final infarct if reperfused", "Predicted final infarct if not reperfused"]
    types = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
    assert types[2:] == [FINAL_IF_REPERFUSED.value, FINAL_IF_NOT_REPERFUSED.value]
    sr = build_sr(findings, seg)
    text = str(sr)
    for meaning in ("Predicted final infarct volume if reperfused", "Tissue reperfusion would save",
                    "Dice of the two predicted final infarcts", "Likely responder to reperfusion"):
        assert meaning in text


def test_the_summary_shows_both_scenarios_side_by_side_and_the_verdict(findings: Findings) -> None:
    lines = text_lines(findings)
    assert any(line.startswith("Final infarct:") and "if reperfused" in line for line in lines)
    assert any("responder: YES" in line for line in lines)
    image = render_summary(findings)
    panel = image[int(0.645 * image.shape[0]):, : int(0.62 * image.shape[1])]
    for colour in SCENARIO_COLOURS.values():
        target = np.asarray(colour) * 255
        close = np.abs(panel.astype(float) - (0.6 * target + 0.4 * panel.astype(float))).max(axis=-1) < 40
        assert close.sum() > 0
    without = dataclasses.replace(findings, segments=findings.segments[:2])
    assert not np.array_equal(render_summary(without)[int(0.645 * image.shape[0]):], image[int(0.645 * image.shape[0]):])


def _ct(findings: Findings, **changes: object) -> Findings:
    """The fixture's truth as CT perfusion Findings: maps, MIP and brain as the CT analysis gives them."""
    shape = findings.geometry.shape
    brain = np.zeros(shape, dtype=bool)
    brain[:, 8:56, 8:56] = True
    maps = {m: np.where(brain, 1.0, 0.0).astype(np.float32) for m in (MapName.CBF, MapName.CBV, MapName.TTP, MapName.TMAX)}
    fields = dict(analysis="ct-perfusion", segments=findings.segments[:2], qc_flags=[], measurements={}, maps=maps, brain=brain,
                  mip=np.full(shape, 40.0, dtype=np.float32), models=[])
    return dataclasses.replace(findings, **{**fields, **changes})


def test_a_ct_study_without_an_input_gets_no_prediction_and_a_flag_naming_it(findings: Findings, tmp_path: Path) -> None:
    ct = _ct(findings)
    no_ttp = _ct(findings, maps={k: v for k, v in ct.maps.items() if k is not MapName.TTP}, mip=None)
    out = add_final_infarct(no_ttp, ModelSet(tmp_path))
    assert len(out.segments) == 2 and len(out.qc_flags) == 1
    assert "no predicted final infarct" in out.qc_flags[0] and "TTP" in out.qc_flags[0] and "MIP" in out.qc_flags[0]
    assert "DWI" not in out.qc_flags[0]  # a CT study is not asked for MRI inputs
    out = add_final_infarct(ct, ModelSet(tmp_path))  # every input there, no network installed
    assert "ct-final-infarct" in out.qc_flags[0] and "not installed" in out.qc_flags[0]


def test_both_predictions_include_the_measured_core_where_the_networks_see_no_lesion(findings: Findings) -> None:
    """The shipped MRI networks on flat maps (nothing to see) and a core the analysis measured: each
    prediction holds the core, since tissue infarcted at imaging stays infarcted either way."""
    shape = findings.geometry.shape
    brain = findings.maps[MapName.ADC] > 0
    core = np.zeros(shape, dtype=bool)
    core[3:5] = brain[3:5]
    core[3:5, :, : shape[2] // 2] = False  # one hemisphere of two slices
    flat = {m: np.where(brain, value, 0).astype(np.float32) for m, value in ((MapName.ADC, 800e-6), (MapName.TMAX, 1.0),
                                                                             (MapName.CBF, 50.0), (MapName.CBV, 4.0))}
    study = dataclasses.replace(findings, segments=[Segment("core", "Ischemic core", core, float(core.sum()) * findings.geometry.voxel_volume_ml)],
                                maps=flat, dwi=np.where(brain, 300.0, 0).astype(np.float32), measurements={}, qc_flags=[], models=[])
    out = add_final_infarct(study, ModelSet(WEIGHTS, Backend.ONNXRUNTIME))
    predicted = {s.key: s for s in out.segments if s.key in (SegmentKind.FINAL_IF_REPERFUSED, SegmentKind.FINAL_IF_NOT_REPERFUSED)}
    assert len(predicted) == 2, out.qc_flags
    for segment in predicted.values():
        assert not (core & ~segment.mask).any()
        assert segment.volume_ml >= float(core.sum()) * findings.geometry.voxel_volume_ml
    assert out.measurements[Measurement.FINAL_IF_REPERFUSED_VOLUME] == pytest.approx(predicted[SegmentKind.FINAL_IF_REPERFUSED].volume_ml)
