"""The cost ledger from Python: meters, exact micro-dollar reports, the Python caller, typed
errors, persistence, and LLM calls of the real LiteLLM proxy (started by ci/test)."""

import gc
import inspect
import json
import math
import os
from collections import defaultdict

import pytest

import hyperfunc as hf

DIMS = ("caller", "endpoint", "model", "label", "run", "user")


def litellm_url():
    url = os.environ.get("HYPERFUNC_LLM_URL")
    if not url:
        pytest.fail("HYPERFUNC_LLM_URL is not set: run the suite with ci/test (it starts the peers)")
    return url


def charge_from_helper(meter, **kw):
    """Charges from another function, so the ledger sees a second caller."""
    line = inspect.currentframe().f_lineno + 1
    micros = meter.charge(**kw)
    return micros, f"{__file__}:charge_from_helper:{line}"


def three_meters(ledger):
    return (
        ledger.meter("unlocker", per_call=0.0015),
        ledger.meter("pdf", per_unit=("page", 0.0004)),
        ledger.meter("search", from_response=True),
    )


def record_mix(ledger):
    """Charges on three meters from two callers (this function and a helper); returns one dict
    per charge (the attribution the ledger should record and what charge() returned)."""
    here = f"{__file__}:record_mix"
    unlocker, pdf, search = three_meters(ledger)
    out = []

    def note(micros, caller, endpoint, model="", label="", run="", user="", units=1.0):
        out.append(dict(caller=caller, endpoint=endpoint, model=model, label=label, run=run,
                        user=user, micros=micros, units=units))

    for i in range(4):
        user = "acme" if i % 2 else "globex"
        line = inspect.currentframe().f_lineno + 1
        m = unlocker.charge(label="fetch", user=user, run="r1")
        note(m, f"{here}:{line}", "unlocker", label="fetch", run="r1", user=user)
    for pages in (3, 2.5, 10):
        line = inspect.currentframe().f_lineno + 1
        m = pdf.charge("parse", units=pages, user="acme", model="ocr-v2")
        note(m, f"{here}:{line}", "pdf", model="ocr-v2", label="parse", user="acme", units=pages)
    for usd in (0.0123, 0.000001, 0.25):
        m, caller = charge_from_helper(search, label="lookup", usd=usd, run="r2")
        note(m, caller, "search", label="lookup", run="r2")
    line = inspect.currentframe().f_lineno + 1
    m = search.charge(usd=0.0)
    note(m, f"{here}:{line}", "search")
    return out


def expected(charges, by):
    groups = defaultdict(lambda: [0, 0])
    for c in charges:
        key = tuple(c[d] for d in by)
        groups[key][0] += 1
        groups[key][1] += c["micros"]
    return {k: tuple(v) for k, v in groups.items()}


def as_groups(report):
    return {tuple(r["key"]): (r["calls"], r["micros"]) for r in report["rows"]}


def test_charges_on_three_meters_sum_exactly_in_every_grouping():
    ledger = hf.Ledger(":memory:")
    charges = record_mix(ledger)
    # What charge() returned: exact integer micro-dollars of each price.
    assert [c["micros"] for c in charges] == [1500] * 4 + [1200, 1000, 4000] + [12300, 1, 250000, 0]
    assert all(isinstance(c["micros"], int) for c in charges)
    total = sum(c["micros"] for c in charges)
    groupings = [[], ["caller"], ["endpoint"], ["caller", "endpoint"], ["user"], ["model"],
                 ["label", "run"], ["endpoint", "user", "label"], list(DIMS)]
    for by in groupings:
        for per_call in (False, True):
            report = ledger.cost_report(by=by, per_call=per_call)
            assert report["by"] == by
            assert report["since"] is None
            assert report["total_calls"] == len(charges)
            assert report["total_micros"] == total
            if by:
                assert as_groups(report) == expected(charges, by), (by, per_call)
            else:
                assert [(r["key"], r["calls"], r["micros"]) for r in report["rows"]] == [
                    ([], len(charges), total)
                ]
            if True:
                micros = [r["micros"] for r in report["rows"]]
                assert micros == sorted(micros, reverse=True)
    # Units: pages for the pdf meter, 1 per call otherwise.
    units = {tuple(r["key"]): r["units"] for r in ledger.cost_report(by=["endpoint"])["rows"]}
    assert units == {("unlocker",): 4.0, ("pdf",): 15.5, ("search",): 4.0}
    # A comma-separated string works too; every call falls on a day.
    assert as_groups(ledger.cost_report(by="endpoint, user")) == expected(charges, ["endpoint", "user"])
    days = ledger.cost_report(by=["day"])
    assert sum(r["calls"] for r in days["rows"]) == len(charges)
    assert all(len(r["key"][0]) == 10 and r["key"][0][4] == "-" for r in days["rows"])
    # The Markdown table.
    table = ledger.cost_table(by=["endpoint"])
    assert table.startswith("| endpoint | calls | USD | share |")
    assert "| search | 4 | 0.262301 |" in table
    assert f"total: {len(charges)} calls, ${total / 1e6:.6f}" in table


def test_rows_are_biggest_spend_first_for_several_dimensions():
    ledger = hf.Ledger(":memory:")
    record_mix(ledger)
    for per_call in (False, True):
        rows = ledger.cost_report(by=["caller", "endpoint"], per_call=per_call)["rows"]
        micros = [r["micros"] for r in rows]
        assert micros == sorted(micros, reverse=True)


def test_the_total_of_an_empty_ledger_is_zero():
    ledger = hf.Ledger(":memory:")
    for per_call in (False, True):
        report = ledger.cost_report(by=[], per_call=per_call)
        assert (report["total_calls"], report["total_micros"], report["rows"]) == (0, 0, [])


def test_the_caller_is_this_file_and_function():
    ledger = hf.Ledger(":memory:")
    meter = ledger.meter("unlocker", per_call=0.001)
    lines = []
    for _ in range(2):  # one code object, cached site: the line still changes per call
        lines.append(inspect.currentframe().f_lineno + 1)
        meter.charge(label="a")
        lines.append(inspect.currentframe().f_lineno + 1)
        meter.charge(label="b")
    _, helper = charge_from_helper(meter)
    meter.charge(call_site="elsewhere.py:wrapper:7")
    rows = as_groups(ledger.cost_report(by=["caller", "label"]))
    function = "test_the_caller_is_this_file_and_function"
    assert rows == {
        (f"{__file__}:{function}:{lines[0]}", "a"): (2, 2000),
        (f"{__file__}:{function}:{lines[1]}", "b"): (2, 2000),
        (helper, ""): (1, 1000),
        ("elsewhere.py:wrapper:7", ""): (1, 1000),
    }
    assert meter.endpoint == "unlocker" and repr(meter) == "Meter('unlocker')"


def test_since_spans_dates_and_unix_seconds():
    ledger = hf.Ledger(":memory:")
    meter = ledger.meter("unlocker", per_call=0.002)
    for _ in range(3):
        meter.charge()
    for since in (None, "30d", "12h", "2w", "2000-01-01", "2000-01-01T12:30", 0):
        r = ledger.cost_report(by=["endpoint"], since=since)
        assert (r["total_calls"], r["total_micros"]) == (3, 6000), since
        r = ledger.cost_report(by=["endpoint"], since=since, per_call=True)
        assert (r["total_calls"], r["total_micros"]) == (3, 6000), since
    for since in ("2999-01-01", 32503680000):
        r = ledger.cost_report(by=["endpoint"], since=since)
        assert (r["total_calls"], r["total_micros"], r["rows"]) == (0, 0, []), since
    assert ledger.cost_report(by=[], since="2000-01-01")["since"] == 946684800


def test_bad_input_raises_with_the_rust_message():
    ledger = hf.Ledger(":memory:")
    unlocker, pdf, search = three_meters(ledger)
    with pytest.raises(hf.ConfigError, match="per-call price.*not negative"):
        ledger.meter("x", per_call=-0.01)
    with pytest.raises(hf.ConfigError, match="per-unit price"):
        ledger.meter("x", per_unit=("page", float("nan")))
    with pytest.raises(hf.ConfigError, match="exactly one"):
        ledger.meter("x")
    with pytest.raises(hf.ConfigError, match="exactly one"):
        ledger.meter("x", per_call=0.1, from_response=True)
    with pytest.raises(hf.ConfigError, match="unknown dimension `customer`"):
        ledger.cost_report(by=["caller", "customer"])
    with pytest.raises(hf.ConfigError, match="unknown dimension"):
        ledger.cost_table(by="customer")
    with pytest.raises(hf.ConfigError, match="dollars must be finite"):
        search.charge(usd=float("nan"))
    with pytest.raises(hf.ConfigError, match="dollars must be finite"):
        search.charge(usd=-1.0)
    with pytest.raises(hf.ConfigError, match="reads the price from the response"):
        search.charge(label="lookup")
    with pytest.raises(hf.ConfigError, match="fixed price"):
        unlocker.charge(usd=0.5)
    with pytest.raises(hf.ConfigError, match="units must be finite and not negative"):
        pdf.charge(units=-2)
    with pytest.raises(hf.ConfigError, match="units must be finite"):
        pdf.charge(units=math.inf)
    with pytest.raises(hf.ConfigError, match="span|YYYY-MM-DD"):
        ledger.cost_report(by=["caller"], since="yesterday")
    with pytest.raises(TypeError, match="since"):
        ledger.cost_report(by=["caller"], since=1.5)
    with pytest.raises(hf.ConfigError, match="window"):
        ledger.compare("run:a", "last week")
    with pytest.raises(hf.ConfigError, match="quality"):
        ledger.quality(1, float("nan"))
    with pytest.raises(hf.ConfigError, match="no LLM call with this id"):
        ledger.quality(12345, 0.5)
    with pytest.raises(hf.ConfigError, match="price table"):
        ledger.reprice("[{\"model\": 3}]")
    with pytest.raises(hf.ConfigError, match="cannot read the price table"):
        ledger.reprice("/nonexistent/prices.json")
    with pytest.raises(hf.ConfigError, match="price"):
        ledger.set_prices([{"model": "m", "from": "2026-13-01", "input": 1, "output": 2}])
    with pytest.raises(hf.ConfigError, match="cache_lifetime_s"):
        ledger.llm_report(cache_lifetime_s=-1.0)
    with pytest.raises(TypeError, match="Ledger"):
        hf.LlmClient("http://127.0.0.1:9/v1").attach_ledger("costs.sqlite")
    # Every error is a HyperfuncError, and nothing was recorded.
    assert issubclass(hf.ConfigError, hf.HyperfuncError)
    assert ledger.cost_report(by=["endpoint"])["total_calls"] == 0


def test_a_corrupt_file_raises_and_is_left_unchanged(tmp_path):
    path = tmp_path / "costs.sqlite"
    junk = b"this is not a sqlite database\x00" * 100
    path.write_bytes(junk)
    with pytest.raises(hf.HyperfuncError, match="not a readable SQLite database"):
        hf.Ledger(path)
    with pytest.raises(hf.ConfigError):
        hf.Ledger(str(path))
    assert path.read_bytes() == junk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["costs.sqlite"]


def test_a_reopened_ledger_file_sees_the_totals(tmp_path):
    path = str(tmp_path / "costs.sqlite")
    first = hf.Ledger(path)
    assert first.path == path and repr(first) == f"Ledger({path!r})"
    charges = record_mix(first)
    first.flush()
    # A second handle on the same file while the first is open.
    other = hf.Ledger(path)
    assert as_groups(other.cost_report(by=["caller", "endpoint"])) == expected(
        charges, ["caller", "endpoint"]
    )
    del first, other
    gc.collect()
    again = hf.Ledger(tmp_path / "costs.sqlite")
    report = again.cost_report(by=list(DIMS))
    assert report["total_calls"] == len(charges)
    assert report["total_micros"] == sum(c["micros"] for c in charges)
    assert as_groups(report) == expected(charges, list(DIMS))
    # Charges after reopening add up with the old ones.
    again.meter("unlocker", per_call=0.0015).charge(label="fetch", user="acme", run="r1")
    totals = as_groups(again.cost_report(by=["endpoint"]))
    assert totals[("unlocker",)] == (5, 7500)


def test_reprice_without_llm_calls_and_price_tables(tmp_path):
    ledger = hf.Ledger(":memory:")
    ledger.meter("unlocker", per_call=0.001).charge()
    table = [{"model": "m", "from": "2024-01-01", "input": 1.0, "output": 2.0}]
    assert ledger.reprice(table) == (0, 0, 0)
    f = tmp_path / "prices.json"
    f.write_text(json.dumps(table))
    assert ledger.reprice(str(f), since="30d") == (0, 0, 0)
    assert ledger.reprice(f) == (0, 0, 0)
    assert ledger.reprice(json.dumps(table)) == (0, 0, 0)
    ledger.set_prices(table)
    assert ledger.prices() == [{"model": "m", "from": "2024-01-01", "input": 1.0, "output": 2.0}]
    # Meter costs are not touched by a reprice.
    assert ledger.cost_report(by=[])["total_micros"] == 1000


def test_reports_of_an_empty_ledger():
    ledger = hf.Ledger()
    assert ledger.path == ":memory:"
    assert ledger.cost_report()["by"] == ["caller"]
    report = ledger.llm_report()
    assert report["calls"] == 0 and report["micros"] == 0 and report["costly"] == []
    assert ledger.llm_report_markdown().startswith("# LLM calls: 0 calls")
    c = ledger.compare("run:a", "run:b")
    assert (c["before"], c["after"], c["before_calls"], c["after_calls"]) == ("run:a", "run:b", 0, 0)
    assert c["deltas"][0]["before"] is None  # the mean of no calls
    assert "before run:a" in ledger.compare_table("run:a", "run:b")
    assert ledger.llm_calls() == []
    ledger.attach(hf.Hub())


def test_llm_calls_of_an_attached_client_appear_in_the_reports():
    client = hf.LlmClient(litellm_url(), "sk-hf-free", cache=False)
    ledger = hf.Ledger(":memory:")
    ledger.set_prices([{"model": "mock-gpt", "from": "2000-01-01", "input": 1.0, "output": 2.0}])
    client.attach_ledger(ledger)
    answers = [client.chat("mock-gpt", f"Say hello {i}.", system="Be brief.") for i in range(3)]
    assert answers == ["Hello from the mock."] * 3
    report = ledger.llm_report(since="1h")
    assert report["calls"] == 3
    assert sum(op["calls"] for op in report["costly"]) == 3
    assert "# LLM calls: 3 calls" in ledger.llm_report_markdown()
    calls = ledger.llm_calls()
    assert [c["model"] for c in calls] == ["mock-gpt"] * 3
    assert [c["prompt"] for c in calls] == [f"Say hello {i}." for i in range(3)]
    assert all(c["system"] == "Be brief." and c["ok"] and c["source"] == "provider" for c in calls)
    # The cost report counts them too, at the table's price.
    llm = as_groups(ledger.cost_report(by=["model"]))
    assert llm[("mock-gpt",)][0] == 3
    assert llm[("mock-gpt",)][1] == sum(c["micros"] for c in calls) == report["micros"]
    # Quality, then a comparison of an empty window with the last hour.
    ledger.quality(calls[0]["id"], 0.75)
    assert ledger.llm_calls()[0]["quality"] == 0.75
    c = ledger.compare("2000-01-01..2000-01-02", "1h")
    assert (c["before_calls"], c["after_calls"]) == (0, 3)
    quality = [d for d in c["deltas"] if d["metric"] == "quality"][0]
    assert (quality["n_after"], quality["after"]) == (1, 0.75)
    # Re-pricing at twice the price re-prices all three calls.
    calls_n, before, after = ledger.reprice(
        [{"model": "mock-gpt", "from": "2000-01-01", "input": 2.0, "output": 4.0}]
    )
    assert (calls_n, before) == (3, report["micros"])
    assert before > 0 and after == 2 * before
    assert ledger.cost_report(by=["model"])["total_micros"] == after
    # The Python caller, label, run and user are recorded.
    client.chat("mock-gpt", "Tagged.", label="greet", run="r1", user="acme")
    tagged = ledger.llm_calls()[-1]
    assert (tagged["who"]["label"], tagged["who"]["run"], tagged["who"]["user"]) == ("greet", "r1", "acme")
    assert "test_ledger.py:test_llm_calls_of_an_attached_client_appear_in_the_reports:" in tagged["who"]["caller"]
