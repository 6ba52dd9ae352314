"""The files stages hand on, read and written through damoc/records.py: a record this version cannot read
fails naming its file and field; fields a newer version adds pass through."""

from __future__ import annotations

import json

import pytest

from damoc import records


def test_a_record_that_does_not_match_names_its_file_and_field(tmp_path):
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "results.json").write_text(json.dumps({"metric": "eval_loss", "candidates": {"a": 1}}))
    with pytest.raises(records.RecordError, match=r"finetune/results.json: candidates: .*rerun the stage"):
        records.read(records.Results, tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"input": 3, "kept": "many"}))
    with pytest.raises(records.RecordError, match=r"data/manifest.json: kept: "):
        records.read(records.Manifest, tmp_path)
    (tmp_path / "data" / "manifest.json").write_text("{not json")
    with pytest.raises(records.RecordError, match=r"data/manifest.json: not JSON"):
        records.read(records.Manifest, tmp_path)


def test_records_round_trip_with_newer_fields_and_a_missing_one_is_none(tmp_path):
    assert records.read(records.Ranking, tmp_path) is None
    ranking = {"metric": "eval_loss", "candidates": [{"name": "a", "status": "finished", "new_field": [1]}],
               "added_later": {"x": 1}}
    records.write(records.Ranking, tmp_path / "report" / "ranking.json", ranking)
    assert records.read(records.Ranking, tmp_path) == ranking
    with pytest.raises(records.RecordError, match="ranking.json: candidates.0.name: Field required"):
        records.write(records.Ranking, tmp_path / "report" / "ranking.json", {"candidates": [{"status": "x"}]})
    assert records.read(records.Ranking, tmp_path) == ranking  # a refused write leaves the file as it was


def test_the_run_spec_comes_back_typed_with_every_default(tmp_path):
    (tmp_path / "spec.yaml").write_text("finetune: {batch_size: 4}\n")
    ft = records.finetune_spec(tmp_path)
    assert ft.batch_size == 4 and ft.max_steps == 200  # the field's own default, not one written by hand
    (tmp_path / "spec.yaml").write_text("finetune: {batch_size: -1}\n")
    with pytest.raises(records.RecordError, match="spec.yaml: finetune.batch_size"):
        records.finetune_spec(tmp_path)
    assert records.finetune_spec(tmp_path / "nowhere") is None
