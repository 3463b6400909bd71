"""core.records: the typed rank and trial records and their JSON, the atomic writer."""

import dataclasses
import json
import os
from typing import Optional

import pytest

from core import record_check
from core.records import (
    SCHEMA_VERSION,
    STATUSES,
    RankRecord,
    TrialRecord,
    read_json,
    write_json_atomic,
    write_text_atomic,
)

BASE = dict(trial="t", status="ok", model={}, cluster={}, layout={}, trial_config={}, world_size=2, dp=2,
            recorded_at="2026-12-01T12:00:00+0000")


def test_a_rank_record_round_trips_and_keeps_unknown_keys():
    data = {"rank": 1, "status": "ok", "step_times_s": [0.2, 0.1], "peak_memory_gb": 1.5, "wgrad_fusion": True}
    record = RankRecord.from_dict(data)
    assert record.step_times_s == [0.2, 0.1] and record.extra == {"wgrad_fusion": True}
    assert record.to_dict() == data  # None fields stay out, unknown keys come back
    assert RankRecord(rank=0, status="error").to_dict() == {"rank": 0, "status": "error"}


def test_update_sets_fields_and_collects_the_rest():
    record = RankRecord(rank=0, status="error").update({"losses": [7.0], "setup_s": {"build": 1.0}},
                                                      status="ok", trial_path="cpu-gloo")
    assert (record.status, record.losses, record.trial_path, record.extra) == ("ok", [7.0], "cpu-gloo", {})
    record.update(custom=3)
    assert record.to_dict()["custom"] == 3


def test_a_trial_record_writes_its_base_fields_even_when_null():
    record = TrialRecord(**BASE)
    out = record.to_dict()
    assert out["schema"] == SCHEMA_VERSION and out["reason"] is None and out["prediction"] is None
    assert "wall_s" not in out and "losses" not in out  # not launched: no measured fields
    launched = dataclasses.replace(record, wall_s=3.0, status="diverged").to_dict()
    assert {"ranks", "env", "trial_path", "peak_memory_gb", "peak_memory_gb_max", "losses",
            "diverged_step"} <= set(launched)  # launched: null says "none measured"
    assert TrialRecord.from_dict(launched).to_dict() == launched


def _good() -> dict:
    return {**TrialRecord(**BASE).to_dict(), "layout": {k: 1 for k in record_check.DEGREES},
            "step_time_s": 1.0, "tokens_per_s": 8.0, "mfu": {"palm": 0.1}}


def test_record_check_requires_every_field_the_record_type_has_no_default_for():
    # BASE holds exactly TrialRecord's fields without a default (the constructor needs them).
    assert set(record_check.REQUIRED) == set(BASE)
    assert record_check.REQUIRED["world_size"] == (int,) and record_check.OK_REQUIRED["step_time_s"] == (int, float)
    good = _good()
    assert record_check.record_problem(good) is None and good["status"] in STATUSES
    for name, kinds in record_check.REQUIRED.items():
        missing = {k: v for k, v in good.items() if k != name}
        assert record_check.record_problem(missing) == \
            f"field {name!r} missing or not a {' or '.join(k.__name__ for k in kinds)}"
    assert record_check.record_problem({**good, "world_size": True}) is not None  # a bool is no count
    assert record_check.record_problem({**good, "schema": SCHEMA_VERSION + 1}) is not None


def test_a_new_required_field_of_the_record_type_is_checked_without_listing_it(monkeypatch):
    @dataclasses.dataclass(kw_only=True)
    class Newer(TrialRecord):
        host: str  # no default: every record must have it
        note: Optional[str] = None  # a default: optional

    assert record_check.required_fields(Newer) == {**record_check.REQUIRED, "host": (str,)}
    monkeypatch.setattr(record_check, "REQUIRED", record_check.required_fields(Newer))
    assert record_check.record_problem(_good()) == "field 'host' missing or not a str"  # control
    assert record_check.record_problem({**_good(), "host": "n1"}) is None


def test_write_json_atomic_leaves_no_temp_file_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": 1})
    assert read_json(path) == {"a": 1} and os.listdir(path.parent) == ["r.json"]
    with pytest.raises(TypeError):
        write_text_atomic(path, object())  # fails while writing: the old file stays whole
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(path.parent) == ["r.json"]
    assert read_json(tmp_path / "missing.json") is None
