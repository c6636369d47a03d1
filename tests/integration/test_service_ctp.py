"""CT perfusion and forwarded vendor maps end to end: storescu -> strokegate serve -> storescp, the
returned SEG and SR valid (dciodvfy) and their volumes compared with the synthetic patient's truth;
the CT study also comes back with both predicted final infarcts (SEG, SR, summary panel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_tools import requires_dciodvfy, requires_storescu
from returned_results import FINAL_LABELS, RoundTrip, check_final_infarcts, check_report_matches_findings, dice, hypoperfused, read_truth, round_trip
from service.phantom.generate import write_patient
from service.phantom.patient import PhantomOptions
from service.results.summary import SCENARIO_COLOURS

pytestmark = [pytest.mark.integration, requires_storescu, requires_dciodvfy, pytest.mark.timeout(400)]

CTP_NOISE_HU = 10.0  # the issue's accuracy targets are set at 10 HU
REPERFUSED, NOT_REPERFUSED = FINAL_LABELS


# ----------------------------------------------------------------------------------- CT perfusion


@pytest.fixture(scope="module")
def ctp_patient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patient 2 (a stroke with a mismatch), CT perfusion only: 256 x 256 x 16, 40 frames, 10 HU noise."""
    out = tmp_path_factory.mktemp("ctp")
    write_patient(2, "ctp", out, PhantomOptions(noise_hu=CTP_NOISE_HU))
    return out / "SGPH00000002"


@pytest.fixture(scope="module")
def ctp_result(tmp_path_factory: pytest.TempPathFactory, ctp_patient: Path) -> RoundTrip:
    return round_trip(tmp_path_factory.mktemp("ctp-service"), ctp_patient / "dicom" / "CT", instances=640)


def test_ctp_comes_back_as_seg_and_sr_with_the_findings(ctp_result: RoundTrip) -> None:
    findings = check_report_matches_findings(ctp_result)
    assert findings["analysis"] == "ct-perfusion"
    assert set(ctp_result.masks) == {"Ischemic core", "Penumbra", "Ischemic core (model)", "Penumbra (model)", REPERFUSED, NOT_REPERFUSED}
    assert findings["core_method"] == "threshold"  # the default: the clinical standard gives the verdict
    assert {"hypoperfused_volume_ml", "mismatch_volume_ml", "mismatch_ratio", "hypoperfusion_intensity_ratio",
            "target_mismatch"} <= set(findings["measurements"])
    assert findings["parameters"]["core_rcbf"] == 0.3 and findings["parameters"]["tmax_threshold_s"] == 6.0
    assert isinstance(findings["qc_flags"], list)


def test_ctp_volumes_agree_with_the_truth(ctp_result: RoundTrip, ctp_patient: Path) -> None:
    """Hypoperfused (Tmax > 6 s): |volume error| <= 10 mL or Dice >= 0.9; core within 10 mL."""
    truth = read_truth(ctp_patient / "truth" / "ct")
    masks = ctp_result.masks
    hypo = hypoperfused(masks)
    hypo_ml = ctp_result.report.measurements["hypoperfused_volume_ml"]
    hypo_dice = dice(hypo, truth.masks["hypoperfused"])
    core_ml = ctp_result.report.volumes["Ischemic core"]
    summary = (f"hypoperfused {hypo_ml:.1f} mL vs truth {truth.volume('hypoperfused'):.1f} mL, Dice {hypo_dice:.3f}; "
               f"core {core_ml:.1f} mL vs {truth.volume('core'):.1f} mL, Dice {dice(masks['Ischemic core'], truth.masks['core']):.3f}")
    print(summary)
    assert hypo.sum() * truth.voxel_ml == pytest.approx(hypo_ml, abs=0.01)  # the SEG draws what the SR reports
    assert abs(hypo_ml - truth.volume("hypoperfused")) <= 10.0 or hypo_dice >= 0.9, summary
    assert abs(core_ml - truth.volume("core")) <= 10.0, summary


def test_ctp_meets_the_issue_accuracy_targets(ctp_result: RoundTrip, ctp_patient: Path) -> None:
    """Issue 4 at 10 HU: hypoperfused Dice >= 0.92 and |volume error| <= 10 mL, core Dice >= 0.75,
    penumbra Dice >= 0.80."""
    truth = read_truth(ctp_patient / "truth" / "ct")
    masks = ctp_result.masks
    scores = {
        "hypoperfused": dice(hypoperfused(masks), truth.masks["hypoperfused"]),
        "core": dice(masks["Ischemic core"], truth.masks["core"]),
        "penumbra": dice(masks.get("Penumbra", masks["Ischemic core"] & False), truth.masks["penumbra"]),
    }
    error = ctp_result.report.measurements["hypoperfused_volume_ml"] - truth.volume("hypoperfused")
    summary = f"Dice {scores}, hypoperfused volume error {error:+.1f} mL"
    print(summary)
    assert scores["hypoperfused"] >= 0.92 and abs(error) <= 10.0, summary
    assert scores["core"] >= 0.75, summary
    assert scores["penumbra"] >= 0.80, summary


def test_the_models_segments_come_back_beside_the_threshold_ones_named_by_the_model(
    ctp_result: RoundTrip, ctp_patient: Path
) -> None:
    """The SEG's model segments are AUTOMATIC, by an Artificial Intelligence algorithm named like the
    model's card, the SR reports their volumes under the model's name, the API names the model."""
    findings = ctp_result.study["jobs"][-1]["findings"]
    card = json.loads((Path(__file__).parents[2] / "models" / "weights" / "ctp-core-penumbra.card.json").read_text())
    assert [(m["name"], m["version"]) for m in findings["models"]][0] == (card["name"], card["version"])
    assert any(flag.startswith(f"CT perfusion model {card['name']}") and "no NIHSS known" in flag for flag in findings["qc_flags"])
    seg = pydicom.dcmread(ctp_result.seg)
    by_label = {item.SegmentLabel: item for item in seg.SegmentSequence}
    for label in ("Ischemic core (model)", "Penumbra (model)"):
        item = by_label[label]
        assert item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == card["name"]
        family = item.SegmentationAlgorithmIdentificationSequence[0]
        assert family.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert family.AlgorithmVersion == card["version"]
    assert by_label["Ischemic core"].SegmentAlgorithmName == "StrokeGate"
    volumes = ctp_result.report.volumes
    assert volumes["Ischemic core (model)"] == pytest.approx(findings["segments"][f"core-{card['name']}"], abs=1e-3)
    sr_text = pydicom.dcmread(ctp_result.sr).to_json()
    assert card["name"] in sr_text
    truth = read_truth(ctp_patient / "truth" / "ct")
    masks = ctp_result.masks
    print(f"model core Dice {dice(masks['Ischemic core (model)'], truth.masks['core']):.3f}, "
          f"penumbra {dice(masks['Penumbra (model)'], truth.masks['penumbra']):.3f}; threshold core "
          f"{dice(masks['Ischemic core'], truth.masks['core']):.3f}, penumbra {dice(masks['Penumbra'], truth.masks['penumbra']):.3f}")
    assert dice(masks["Ischemic core (model)"] | masks["Penumbra (model)"], truth.masks["hypoperfused"]) >= 0.8


def test_ctp_comes_back_with_both_predicted_final_infarcts(ctp_result: RoundTrip, ctp_patient: Path) -> None:
    """Seed 001's CT pair: both predictions in the SEG (drawn by the CT networks), their volumes, the
    tissue reperfusion would save, their Dice and the verdict in the SR and the API, the two-scenario
    panel in the summary image; each prediction close to the phantom's final infarct of its scenario."""
    findings = ctp_result.study["jobs"][-1]["findings"]
    assert {m["name"] for m in findings["models"]} >= {"ct-final-infarct-reperfused", "ct-final-infarct-not-reperfused"}
    assert not any(flag.startswith("no predicted final infarct") for flag in findings["qc_flags"]), findings["qc_flags"]
    seg = pydicom.dcmread(ctp_result.seg)
    names = {item.SegmentLabel: item.SegmentAlgorithmName for item in seg.SegmentSequence}
    assert names[REPERFUSED] == "ct-final-infarct-reperfused" and names[NOT_REPERFUSED] == "ct-final-infarct-not-reperfused"
    measured = check_final_infarcts(ctp_result)
    assert ctp_result.report.volumes[REPERFUSED] == pytest.approx(measured["predicted_final_reperfused_ml"], abs=1e-2)
    masks, truth = ctp_result.masks, read_truth(ctp_patient / "truth" / "ct")
    scores = {label: dice(masks[label], truth.masks[key]) for label, key in
              ((REPERFUSED, "final_reperfused"), (NOT_REPERFUSED, "final_not_reperfused"))}
    print(f"Dice against the phantom's final infarcts {scores}")
    assert min(scores.values()) >= 0.7, scores
    summary = pydicom.dcmread(ctp_result.summary).pixel_array
    panel = summary[int(0.645 * summary.shape[0]):, : int(0.62 * summary.shape[1])].astype(float)
    for colour in SCENARIO_COLOURS.values():  # both scenarios drawn in the panel, each in its colour
        target = np.asarray(colour) * 255
        assert (np.abs(panel - (0.6 * target + 0.4 * panel)).max(axis=-1) < 40).sum() > 0


# ------------------------------------------------------------------------------------ vendor maps


@pytest.fixture(scope="module")
def maps_patient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patient 2's vendor-style CBF, CBV, MTT, TTP and Tmax maps (no raw perfusion)."""
    out = tmp_path_factory.mktemp("maps")
    write_patient(2, "maps", out)
    return out / "SGPH00000002"


def test_vendor_maps_come_back_as_core_and_penumbra(tmp_path: Path, maps_patient: Path) -> None:
    result = round_trip(tmp_path, maps_patient / "dicom" / "CT", instances=5 * 16)
    findings = check_report_matches_findings(result)
    assert findings["analysis"] == "vendor-perfusion-maps"
    truth = read_truth(maps_patient / "truth" / "ct")
    hypo_ml = result.report.measurements["hypoperfused_volume_ml"]
    hypo_dice = dice(hypoperfused(result.masks), truth.masks["hypoperfused"])
    core_dice = dice(result.masks["Ischemic core"], truth.masks["core"])
    summary = (f"hypoperfused {hypo_ml:.1f} mL vs {truth.volume('hypoperfused'):.1f} mL, Dice {hypo_dice:.3f}; core "
               f"{result.report.volumes['Ischemic core']:.1f} mL vs {truth.volume('core'):.1f} mL, Dice {core_dice:.3f}")
    print(summary)
    assert abs(hypo_ml - truth.volume("hypoperfused")) <= 10.0 or hypo_dice >= 0.9, summary
    assert core_dice >= 0.8, summary
