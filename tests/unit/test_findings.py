"""The contract between the stages: vocabularies that stay what the database, the API and the
result files already hold, and that refuse what is not in them."""

from __future__ import annotations

import numpy as np
import pytest

from service.findings import (
    Analysis,
    CoreMethod,
    Findings,
    MapName,
    Measurement,
    ModelInfo,
    ResultCategory,
    ResultKind,
    Segment,
    SegmentKind,
)
from service.imaging.geometry import Geometry


@pytest.mark.parametrize("name", ["SEG", "SR", "SUMMARY", "MAP-cbf-001", "MAP-tmax-016", "PM-adc"])
def test_result_kinds_keep_the_names_stored_in_the_database(name: str) -> None:
    assert ResultKind.parse(name).name == name


def test_a_map_result_knows_its_category_map_and_slice() -> None:
    kind = ResultKind.parse("MAP-tmax-003")
    assert (kind.category, kind.map, kind.index) == (ResultCategory.MAPS, MapName.TMAX, 3)
    assert ResultKind.parse("PM-cbv").category is ResultCategory.VALUES


@pytest.mark.parametrize("name", ["MAP-xyz-001", "PM-", "seg", "MAP-cbf-1", "SEG2"])
def test_an_unknown_result_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        ResultKind.parse(name)


def test_a_result_kind_must_be_whole() -> None:
    with pytest.raises(ValueError):
        ResultKind(ResultCategory.MAPS, MapName.CBF)  # a colour series image needs its slice
    with pytest.raises(ValueError):
        ResultKind(ResultCategory.SEG, MapName.CBF)


def test_maps_keep_their_series_places_and_units() -> None:
    assert [m.place for m in MapName] == [0, 1, 2, 3, 4, 5]
    assert (MapName.TMAX.title, MapName.TMAX.unit, MapName.CBF.unit) == ("Tmax", "s", "ml/100g/min")
    assert Measurement.CORE_VOLUME.unit == "ml" and Measurement.MISMATCH_RATIO.unit == "ratio"
    assert Measurement.TARGET_MISMATCH.unit == "1"


def findings(**changes: object) -> Findings:
    mask = np.zeros((2, 3, 3), dtype=bool)
    values = dict(
        study_uid="1.2.3", version=1, analysis="ct-perfusion", geometry=Geometry((2, 3, 3), (5.0, 1.0, 1.0), (0, 0, 0)),
        source_images=[], segments=[Segment("core", "Ischemic core", mask, 1.5)],
        measurements={"core_volume_ml": 1.5}, maps={"cbf": np.zeros((2, 3, 3), np.float32)},
    )
    values.update(changes)
    return Findings(**values)


def test_names_given_as_text_become_the_vocabulary_once() -> None:
    found = findings()
    assert found.analysis is Analysis.CT_PERFUSION
    assert list(found.measurements) == [Measurement.CORE_VOLUME]
    assert list(found.maps) == [MapName.CBF]
    assert found.segments[0].key is SegmentKind.CORE
    with pytest.raises(ValueError):
        findings(measurements={"core_volume": 1.5})
    with pytest.raises(ValueError):
        findings(analysis="ct-perfusion-v2")


def test_a_models_segment_is_told_apart_and_named_in_the_summary() -> None:
    model = ModelInfo("ctp-core-penumbra", "0.1.0", "ab" * 32, "onnxruntime (CPUExecutionProvider)")
    mask = np.zeros((2, 3, 3), dtype=bool)
    found = findings(segments=[Segment("core", "Ischemic core", mask, 1.5),
                               Segment("core", "Ischemic core (model)", mask, 2.0, model=model)], models=[model])
    assert [s.ident for s in found.segments] == ["core", "core-ctp-core-penumbra"]
    assert found.segment(SegmentKind.CORE).volume_ml == 1.5  # the threshold method's: the default verdict
    summary = found.summary()
    assert summary["segments"] == {"core": 1.5, "core-ctp-core-penumbra": 2.0}
    assert summary["core_method"] == "threshold"
    assert summary["models"] == [{"name": "ctp-core-penumbra", "version": "0.1.0", "sha256": "ab" * 32,
                                  "backend": "onnxruntime (CPUExecutionProvider)"}]
    assert summary["analysis"] == "ct-perfusion" and summary["measurements"] == {"core_volume_ml": 1.5}


def test_the_verdict_uses_the_models_segments_when_asked() -> None:
    model = ModelInfo("ctp-core-penumbra", "0.1.0", "ab" * 32, "onnxruntime (CPUExecutionProvider)")
    mask = np.zeros((2, 3, 3), dtype=bool)
    found = findings(segments=[Segment("core", "Ischemic core", mask, 1.5),
                               Segment("core", "Ischemic core (model)", mask, 2.0, model=model)],
                     models=[model], core_method="model")
    assert found.core_method is CoreMethod.MODEL
    assert found.segment(SegmentKind.CORE).volume_ml == 2.0
    assert [found.uses(s) for s in found.segments] == [False, True]
    assert found.summary()["core_method"] == "model"
    with pytest.raises(ValueError):
        findings(core_method="consensus")
