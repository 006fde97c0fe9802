"""A grid's plans handed out by raystudy, counted against the trials Ray holds
(raystudy.cluster.trial_count), called as Ray calls it (no Ray running)."""

from __future__ import annotations

import pickle

import pytest

pytest.importorskip("ray")

from ray.tune.search import ConcurrencyLimiter, Searcher  # noqa: E402
from test_searcher import running_trials  # noqa: E402

from raystudy.cluster.trial_count import PlanSearcher, RayTrials, counted_search  # noqa: E402

PLANS = [{"mechanism": name, "seed": 0} for name in ("ST", "SAM", "JR")]


def test_each_plan_is_handed_out_once_in_order_within_the_limit():
    limiter = ConcurrencyLimiter(PlanSearcher(PLANS, "g"), max_concurrent=2)  # as Ray wraps it
    steps = RayTrials("g")
    steps.on_step_begin(0, [])
    assert [limiter.suggest(t) for t in "abc"] == [{"plan": PLANS[0]}, {"plan": PLANS[1]}, None]
    steps.on_step_begin(1, running_trials("a", "b", finished=("a",), plans={"a": PLANS[0], "b": PLANS[1]}))
    limiter.on_trial_complete("a", {})
    assert limiter.suggest("c") == {"plan": PLANS[2]}
    steps.on_step_begin(2, running_trials("a", "b", "c", finished=("a", "b", "c"), plans=dict(zip("abc", PLANS))))
    assert limiter.suggest("d") is Searcher.FINISHED


def test_a_resumed_grid_runs_the_plans_no_trial_ray_holds_runs():
    """Restored from a save made when only the first plan was out, with Ray's trial list newer
    (two plans out): the second plan is not handed out again, the third is."""
    searcher = PlanSearcher(PLANS, "g")
    searcher.set_max_concurrency(1)
    assert searcher.suggest("a") == {"plan": PLANS[0]} and searcher.suggest("b") is None
    again = pickle.loads(pickle.dumps(searcher))
    ray_holds = running_trials("a", "b", finished=("a",), plans={"a": PLANS[0], "b": PLANS[1]})
    RayTrials("g").on_step_begin(0, ray_holds)
    assert again.suggest("c") is None  # b runs
    RayTrials("g").on_step_begin(1, running_trials("a", "b", finished=("a", "b"), plans={"a": PLANS[0], "b": PLANS[1]}))
    assert again.suggest("c") == {"plan": PLANS[2]} and again.suggest("d") is Searcher.FINISHED


def test_its_saved_limit_is_json_and_a_bad_file_keeps_the_given_limit(tmp_path):
    searcher = PlanSearcher(PLANS, "g")
    searcher.set_max_concurrency(2)
    searcher.save(str(tmp_path / "s"))
    again = PlanSearcher(PLANS, "g")
    again.restore(str(tmp_path / "s"))
    assert again.max_concurrent == 2
    for hostile in (b"\x80\x04K.", b'{"max_concurrent": -3}', b'{"max_concurrent": true}', b"[1]"):
        (tmp_path / "bad").write_bytes(hostile)
        again.restore(str(tmp_path / "bad"))
        assert again.max_concurrent == 2


def test_rays_saved_count_and_finished_are_not_restored():
    """Ray's saved "finished" and count of suggestions, uploaded ahead of a trial list that lacks
    the last plan, would end the resumed grid one plan short, and every resume after it."""
    searcher = PlanSearcher(PLANS, "g")
    search = counted_search(searcher, max_concurrent=1)
    search.set_state({"counter": 3, "total_samples": 3, "finished": True, "experiment": None})
    assert not search.is_finished()
    holds = running_trials("a", "b", finished=("a", "b"), plans={"a": PLANS[0], "b": PLANS[1]})
    RayTrials("g").on_step_begin(0, holds)
    assert search.searcher.suggest("c") == {"plan": PLANS[2]}
