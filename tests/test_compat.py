"""Every private library name DaMoC's workarounds rely on (damoc/compat.py::PRIVATE_NAMES) still exists with
the shape it had when checked: an upgrade of Ray, Tune, DeepSpeed or torch that moves one fails here, naming
the workaround."""

from __future__ import annotations

import pytest

from damoc import compat


def test_every_private_name_a_workaround_uses_is_there():
    assert not compat.private_name_problems(), "\n".join(compat.private_name_problems())


@pytest.mark.parametrize("entry, says", [
    (("gone_module", "ray._private.no_such_module", "x", "function"), "compat.gone_module: ray._private.no_such_module.x"),
    (("gone_attr", "ray.tune.schedulers.async_hyperband", "_Bracket._no_such", "attribute"), "compat.gone_attr"),
    (("gone_param", "ray._private.parameter", "RayParams.__init__(no_such_param)", "parameter"), "takes no no_such_param"),
    (("not_a_dict", "deepspeed.ops", "__name__", "dict"), "not a dict"),
])
def test_a_moved_private_name_is_reported_by_its_workaround(monkeypatch, entry, says):
    monkeypatch.setattr(compat, "PRIVATE_NAMES", [entry])
    problems = compat.private_name_problems()
    assert len(problems) == 1 and says in problems[0] and "checked against" in problems[0]


def test_asha_rung_records_round_trip():
    from ray.tune.schedulers import ASHAScheduler

    sched = ASHAScheduler(time_attr="step", metric="m", mode="min", grace_period=2, reduction_factor=2, max_t=8)
    for bracket in sched._brackets:
        bracket._rungs[0][1]["trial-a"] = 1.5
    saved = compat.asha_rung_records(sched)
    fresh = ASHAScheduler(time_attr="step", metric="m", mode="min", grace_period=2, reduction_factor=2, max_t=8)
    compat.load_asha_rung_records(fresh, saved)
    assert compat.asha_rung_records(fresh) == saved and saved[0][str(sched._brackets[0]._rungs[0][0])] == {"trial-a": 1.5}
