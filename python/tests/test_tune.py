"""Tuned calls from Python: the decorator over sync and async functions, Thompson sampling
converging, failures recorded, bad inputs rejected, state surviving a reopen, the report."""

import asyncio
import inspect
import math
import random

import pytest

import hyperfunc as hf


def test_thompson_converges_to_the_best_choice():
    tuner = hf.Tuner(":memory:", seed=7)
    success = {"a": 0.3, "b": 0.8, "c": 0.5}
    script = random.Random(11)

    @tuner.tune("pick", choices=list(success))
    def pick(*, choice):
        return choice

    picks = []
    for _ in range(600):
        chosen, outcome = pick.with_outcome()
        assert chosen == outcome.choice
        outcome.reward(1.0 if script.random() < success[chosen] else 0.0)
        picks.append(chosen)
    last = picks[-200:]
    assert last.count("b") / len(last) >= 0.8, {c: last.count(c) for c in success}
    assert tuner.report("pick")["groups"][0]["winner"] == "b"


def test_sync_function_returns_its_value_and_records_the_call():
    tuner = hf.Tuner(":memory:", seed=1)

    @tuner.tune("classify", choices=["small", "large"], context="badge-type")
    def classify(text, suffix="", *, choice):
        """Doc kept."""
        return f"{text}{suffix}:{choice}"

    assert classify.__name__ == "classify" and classify.__doc__ == "Doc kept."
    value = classify("hi", suffix="!")
    assert value in ("hi!:small", "hi!:large")
    value, outcome = classify.with_outcome("x")
    call_line = inspect.currentframe().f_lineno - 1
    assert value == f"x:{outcome.choice}"
    assert isinstance(outcome.id, int)
    assert 0.0 < outcome.probability <= 1.0
    assert outcome.latency_s >= 0.0
    file, function, line = outcome.caller
    assert file == __file__
    assert function == "test_sync_function_returns_its_value_and_records_the_call"
    assert line == call_line
    outcome.reward(1.0)
    outcome.cost(0.25)
    calls = tuner.calls("classify")
    assert len(calls) == 2
    assert calls[1]["id"] == outcome.id and calls[1]["reward"] == 1.0
    assert calls[1]["cost"] == 0.25 and calls[1]["context"] == "badge-type"
    assert calls[1]["caller"] == f"{__file__}:{function}:{call_line}"


def test_async_function_is_awaited_in_the_callers_loop():
    tuner = hf.Tuner(":memory:", seed=2)
    loops = []

    @tuner.tune("fetch", choices=["direct", "proxy"])
    async def fetch(url, *, choice):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0.01)
        return (url, choice)

    assert asyncio.iscoroutinefunction(fetch)

    async def main():
        plain = await fetch("u1")
        pair = await fetch.with_outcome("u2")
        both = await asyncio.gather(fetch("u3"), fetch("u4"))
        return asyncio.get_running_loop(), plain, pair, both

    loop, plain, (value, outcome), both = asyncio.run(main())
    assert all(l is loop for l in loops) and len(loops) == 4
    assert plain[0] == "u1" and plain[1] in ("direct", "proxy")
    assert value == ("u2", outcome.choice)
    assert [b[0] for b in both] == ["u3", "u4"]
    assert outcome.latency_s >= 0.005
    outcome.reward(0.5)
    report = tuner.report("fetch")["groups"][0]
    assert sum(c["calls"] for c in report["choices"]) == 4


def test_exceptions_propagate_unchanged_and_count_as_failed_calls():
    tuner = hf.Tuner(":memory:", seed=3)
    boom = ValueError("boom")

    @tuner.tune("fragile", choices=["only"])
    def fragile(*, choice):
        raise boom

    @tuner.tune("afragile", choices=["only"])
    async def afragile(*, choice):
        await asyncio.sleep(0)
        raise KeyError("missing")

    with pytest.raises(ValueError) as info:
        fragile()
    assert info.value is boom
    with pytest.raises(KeyError):
        asyncio.run(afragile())
    for label, message in [("fragile", "ValueError: boom"), ("afragile", "KeyError: 'missing'")]:
        (choice,) = tuner.report(label)["groups"][0]["choices"]
        assert choice["calls"] == 1 and choice["errors"] == 1
        assert choice["success_rate"] == 0.0
        (call,) = tuner.calls(label)
        assert call["error"] == message


def test_a_cancelled_async_call_records_nothing():
    tuner = hf.Tuner(":memory:")
    started = []

    @tuner.tune("slow", choices=["x"])
    async def slow(*, choice):
        started.append(choice)
        await asyncio.sleep(10)

    async def main():
        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert started == ["x"]
    assert tuner.calls("slow") == []


def test_bad_inputs_raise_clear_errors():
    tuner = hf.Tuner(":memory:")

    @tuner.tune("f", choices=["a", "b"])
    def f(*, choice):
        return choice

    _, outcome = f.with_outcome()
    with pytest.raises(hf.ConfigError, match="reward"):
        outcome.reward(float("nan"))
    with pytest.raises(hf.ConfigError, match="cost"):
        outcome.cost(-1.0)
    outcome.reward(1.0)
    with pytest.raises(hf.ConfigError, match="already"):
        outcome.reward(1.0)
    with pytest.raises(hf.ConfigError, match="no such call"):
        tuner.reward(12345, 1.0)
    with pytest.raises(hf.ConfigError, match="empty"):
        tuner.tune("g", choices=[])
    with pytest.raises(hf.ConfigError, match="twice"):
        tuner.tune("g", choices=["a", "a"])
    with pytest.raises(hf.ConfigError, match="unknown choice `c`"):
        tuner.tune("g", choices=["a", "b"], policy=("fixed", "c"))
    with pytest.raises(hf.ConfigError, match="policy"):
        tuner.tune("g", choices=["a"], policy="greedy")
    with pytest.raises(hf.ConfigError, match="ε"):
        tuner.tune("g", choices=["a"], policy=("epsilon_greedy", 1.5))
    with pytest.raises(hf.ConfigError, match="objective"):
        tuner.tune("g", choices=["a"], objective=("quality_minus_cost", math.inf))
    # A tuner-wide fixed choice is checked against each call's choices when it runs.
    frozen = hf.Tuner(":memory:", policy=("fixed", "zzz"))

    @frozen.tune("h", choices=["a", "b"])
    def h(*, choice):
        raise AssertionError("must not run")

    with pytest.raises(hf.ConfigError, match="unknown choice `zzz`"):
        h()
    assert frozen.calls() == []


def test_a_fixed_policy_always_picks_its_choice():
    tuner = hf.Tuner(":memory:")

    @tuner.tune("ab", choices=["a", "b"], policy=("fixed", "b"))
    def ab(*, choice):
        return choice

    outs = [ab.with_outcome() for _ in range(20)]
    assert all(v == "b" and o.probability == 1.0 for v, o in outs)


def test_a_corrupt_store_file_raises_and_is_left_untouched(tmp_path):
    path = tmp_path / "tune.db"
    junk = b"this is not a sqlite database\x00" * 100
    path.write_bytes(junk)
    with pytest.raises(hf.HyperfuncError):
        hf.Tuner(str(path))
    assert path.read_bytes() == junk


def test_state_survives_reopening_a_file_store(tmp_path):
    path = str(tmp_path / "tune.db")
    first = hf.Tuner(path, seed=5)

    @first.tune("persist", choices=["a", "b"], context="ctx")
    def persist(*, choice):
        return choice == "b"

    ids = []
    for _ in range(30):
        good, outcome = persist.with_outcome()
        outcome.reward(1.0 if good else 0.0)
        ids.append(outcome.id)
    _, late = persist.with_outcome()
    first.flush()
    before = first.report("persist")
    del first, persist

    second = hf.Tuner(path)
    assert second.report("persist") == before
    assert sum(c["calls"] for c in before["groups"][0]["choices"]) == 31
    # A reward reported after the restart, by id, reaches the stored call.
    second.reward(late.id, 1.0)
    (call,) = [c for c in second.calls("persist") if c["id"] == late.id]
    assert call["reward"] == 1.0
    assert len({c["id"] for c in second.calls("persist")}) == 31


def test_report_structure():
    tuner = hf.Tuner(":memory:", seed=9, objective=("quality_minus_cost", 10.0))

    @tuner.tune("r", choices=["cheap", "dear"], context="k")
    def r(*, choice):
        return choice

    for _ in range(10):
        choice, outcome = r.with_outcome()
        outcome.reward(1.0)
        outcome.cost(0.001 if choice == "cheap" else 0.5)
    report = tuner.report()
    assert list(report) == ["groups"]
    (group,) = report["groups"]
    assert (group["label"], group["context"]) == ("r", "k")
    assert group["winner"] == "cheap"
    names = [c["choice"] for c in group["choices"]]
    assert names == ["cheap", "dear"]
    keys = {"choice", "calls", "errors", "success_rate", "rewards", "mean_reward", "ci95",
            "total_cost_usd", "mean_cost_usd", "resets"}
    for c in group["choices"]:
        assert keys <= set(c)
    assert sum(c["calls"] for c in group["choices"]) == 10
    assert tuner.report("other") == {"groups": []}
    table = tuner.report_table()
    assert "r [k]" in table and "cheap" in table


def test_module_level_decorator_uses_the_default_tuner():
    @hf.tune("module-level", choices=["one"])
    def one(x, *, choice):
        return x + 1

    assert one(1) == 2
    assert hf.default_tuner().calls("module-level")[-1]["choice"] == "one"
