"""A trial's record, exactly: its layout, its rows, and the flat keys of results written before records."""

from __future__ import annotations

import math

from raystudy.persist.record import (
    RECORD_FORMAT,
    MetricRow,
    flat,
    make_record,
    objective_rows,
    rows_of,
    training_rows,
)

ROWS = [
    MetricRow("asr", 0.5, attack="pgd", mode="untargeted", budget=8, target="vgg16"),
    MetricRow("smoothness", 3.0, statistic="mean"),
    MetricRow("test_acc", 0.9),
    MetricRow("acc", float("nan")),
]


def test_a_record_is_exactly_its_parts_and_its_rows_come_back():
    record = make_record({"mechanism": "SAM"}, {"train": {}}, {"name": "s"}, {"torch": "2"}, ROWS)
    assert record == {
        "format": RECORD_FORMAT,
        "identity": {"mechanism": "SAM"},
        "plan": {"train": {}},
        "study": {"name": "s"},
        "versions": {"torch": "2"},
        "metrics": [
            {"name": "asr", "value": 0.5, "attack": "pgd", "mode": "untargeted", "budget": 8, "target": "vgg16"},
            {"name": "smoothness", "value": 3.0, "statistic": "mean"},
            {"name": "test_acc", "value": 0.9},
            {"name": "acc", "value": record["metrics"][3]["value"]},
        ],
    }
    assert math.isnan(record["metrics"][3]["value"])
    back = rows_of(record)
    assert back[:3] == ROWS[:3] and math.isnan(back[3].value)
    assert rows_of({}) == []
    assert MetricRow("x", None).to_dict() == {"name": "x", "value": None}  # a value is always kept


def test_keys_of_rows():
    assert flat(ROWS[:3]) == {"asr/pgd/untargeted/8/vgg16": 0.5, "smoothness/mean": 3.0, "test_acc": 0.9}


def test_objective_and_held_out_rows_average_their_own_targets_only():
    rows = [
        MetricRow("asr", v, attack="pgd", mode="untargeted", budget=8, target=t)
        for t, v in (("a", 0.2), ("b", 0.4), ("c", 0.9), ("mean", 0.5))
    ]
    rows.append(MetricRow("asr", 1.0, attack="pgd", mode="untargeted", budget=4, target="a"))
    out = objective_rows(rows, "asr/pgd/untargeted/8/mean", ["a", "b"])
    assert [(r.target, round(r.value, 9), r.budget) for r in out] == [("objective", 0.3, 8), ("held_out", 0.9, 8)]
    assert [r.target for r in objective_rows(rows, "asr/pgd/untargeted/8/mean", ["a", "b", "c"])] == ["objective"]


def test_training_rows_keep_numbers_only():
    assert training_rows({"loss": 1, "acc": 0.5, "ok": True, "name": "x"}) == [
        MetricRow("loss", 1.0),
        MetricRow("acc", 0.5),
    ]
