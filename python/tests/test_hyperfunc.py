"""The Python bindings: the demos' figures, θ through numpy, Python and async hyperfunctions,
errors with tracebacks, reproducibility, and the GIL released while Rust works."""

import asyncio
import math
import pathlib
import runpy
import sys
import threading
import time

import numpy as np
import pytest

import hyperfunc as hf

XOR_X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
XOR_Y = np.array([[0], [1], [1], [0]], dtype=np.float32)


class Xor(hf.HyperSystem):
    """The Rust demo's system (demos/xor.rs), subclassed in Python."""

    def __init__(self):
        self.hidden = hf.Linear("hidden", 2, 4, "tanh", noise_rank=2)
        self.output = hf.Linear("output", 4, 1, "sigmoid")

    def run(self, cx, x):
        return cx.call(self.output, cx.call(self.hidden, x))


def xor_optimize(system):
    return hf.optimize(
        system, hf.Examples(XOR_X, XOR_Y), "bce",
        pop_size=64, sigma=0.1, lr=0.1, generations=300, seed=42, minimize=True,
        progress=False,
    )


def test_xor_reaches_the_rust_demos_figures_and_a_python_system_equals_a_chain():
    data = hf.Examples(XOR_X, XOR_Y)
    xor = Xor()
    report = xor_optimize(xor)
    assert hf.evaluate(xor, report.theta, data, "accuracy") == 1.0
    assert hf.evaluate(xor, report.theta, data, "bce") < 0.05
    assert len(report.history) == 300
    # The same system as a Rust chain trains to the bit-identical θ: the Python `run` adds
    # nothing but the calls it makes.
    chain = hf.Chain([xor.hidden, xor.output])
    assert xor_optimize(chain).theta.bit_eq(report.theta)


def affine_data():
    s, a = 2.5, math.pi / 3
    m = np.array([[s * math.cos(a), -s * math.sin(a)], [s * math.sin(a), s * math.cos(a)]])
    xs = []
    for i in range(64):
        t = i * 0.618034 * 2 * math.pi
        r = 0.5 + (i % 8) * 0.25
        xs.append([r * math.cos(t), r * math.sin(t)])
    x = np.array(xs, dtype=np.float32)
    y = (x.astype(np.float64) @ m.T).astype(np.float32)
    return hf.Examples(x, y)


def test_affine_with_python_tensor_bodies_reaches_the_rust_demos_figures():
    def mapping(name):
        # x: [P, N, 2], w: [P, 2, 2]: x · wᵀ for every candidate at once.
        return hf.tensor(name, hf.ParamSpec.matrix(2, 2), lambda x, w: x @ np.swapaxes(w, -1, -2))

    net = hf.Chain([mapping("first"), mapping("second")])
    data = affine_data()
    initial = hf.evaluate(net, hf.Theta.init(net, 3), data, "mse")
    report = hf.optimize(
        net, data, "mse", pop_size=32, sigma=0.05, lr=0.05, generations=200, seed=3,
        minimize=True, target=1e-4, progress=False,
    )
    assert initial > 4.0
    assert hf.evaluate(net, report.theta, data, "mse") < 1e-3
    assert len(report.history) <= 200


def test_theta_round_trips_through_numpy_and_files(tmp_path):
    net = hf.Chain([hf.Linear("l", 3, 2, "tanh")])
    theta = hf.Theta.init(net, 5)
    arrays = theta.to_numpy()
    assert set(arrays) == {"l.weight", "l.bias"}
    assert arrays["l.weight"].shape == (2, 3) and arrays["l.weight"].dtype == np.float32
    back = hf.Theta.from_numpy(arrays)
    assert back.bit_eq(theta)
    np.testing.assert_array_equal(theta["l.weight"], arrays["l.weight"])
    # A changed array is a different θ, and evaluation sees the change.
    x = np.ones((4, 3), dtype=np.float32)
    data = hf.Examples(x, np.zeros((4, 2), dtype=np.float32))
    arrays["l.bias"] = np.array([5.0, 5.0], dtype=np.float32)
    moved = hf.Theta.from_numpy(arrays)
    assert not moved.bit_eq(theta)
    assert hf.evaluate(net, moved, data, "mse") > hf.evaluate(net, theta, data, "mse")
    path = str(tmp_path / "theta.safetensors")
    moved.save(path)
    assert hf.Theta.load(path).bit_eq(moved)
    with pytest.raises(KeyError, match="l.weight"):
        theta["nope"]


def test_async_def_hyperfunctions_are_awaited_concurrently():
    n = 8
    state = {"in_flight": 0, "peak": 0}
    all_in = None

    async def double(x, params):
        nonlocal all_in
        if all_in is None:
            all_in = asyncio.Event()
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        if state["in_flight"] == n:
            all_in.set()
        # Every call waits until all n are in flight: only concurrent awaiting finishes.
        await asyncio.wait_for(all_in.wait(), timeout=30)
        state["in_flight"] -= 1
        return x * 2 + params[0]

    f = hf.function("double", double, hf.ParamSpec([1], init=0.5))
    sys_ = hf.Chain([f])
    data = hf.examples([hf.Example(i, 2 * i + 0.5) for i in range(n)])
    seen = []

    def exact(pred, target):
        seen.append(pred)
        return float(np.mean([p == t for p, t in zip(pred, target)]))

    assert hf.evaluate(sys_, hf.Theta.init(sys_), data, exact) == 1.0
    assert state["peak"] == n
    assert seen[0] == [2 * i + 0.5 for i in range(n)]


def test_sync_python_hyperfunctions_learn_lm_params_like_the_rust_demo():
    # demos/lm_params.rs in Python: a toy "model" reports its temperature; 0.5 is best.
    def toy(prompt, params):
        return hf.LmParams.from_values(params).temperature

    sys_ = hf.Chain([hf.function("toy_llm", toy, hf.LmParams.spec())])
    data = hf.examples([hf.Example(f"question {i}", 0.5) for i in range(4)])

    def distance(pred, target):
        return float(np.mean([abs(p - t) for p, t in zip(pred, target)]))

    start = hf.evaluate(sys_, hf.Theta.init(sys_), data, distance)
    report = hf.optimize(
        sys_, data, distance, pop_size=32, sigma=0.1, lr=0.04, optimizer="sgd", momentum=0.0,
        generations=20, seed=7, minimize=True, progress=False,
    )
    assert abs(start - 0.2) < 1e-3  # the default temperature 0.7
    assert hf.evaluate(sys_, report.theta, data, distance) < 0.05


def raise_in_helper(x):
    return 1 / (x - x)


def test_exceptions_from_python_callbacks_surface_with_their_traceback():
    data = hf.examples([hf.Example(1, 1)])
    bad = hf.Chain([hf.function("bad", raise_in_helper)])
    with pytest.raises(hf.CallError) as e:
        hf.evaluate(bad, hf.Theta.init(bad), data, lambda p, y: 0.0)
    text = str(e.value)
    assert "ZeroDivisionError" in text and "raise_in_helper" in text and "line" in text
    assert "`bad`" in text

    async def bad_async(x):
        await asyncio.sleep(0)
        raise ValueError("async body broke")

    abad = hf.Chain([hf.function("abad", bad_async)])
    with pytest.raises(hf.CallError, match="ValueError: async body broke"):
        hf.evaluate(abad, hf.Theta.init(abad), data, lambda p, y: 0.0)

    def bad_metric(pred, target):
        return raise_in_helper(1)

    net = hf.Chain([hf.Linear("l", 2, 1)])
    with pytest.raises(hf.CallError) as e:
        hf.evaluate(net, hf.Theta.init(net), hf.Examples(XOR_X, XOR_Y), bad_metric)
    assert "bad_metric" in str(e.value) and "ZeroDivisionError" in str(e.value)

    class Broken(hf.HyperSystem):
        def __init__(self):
            self.l = hf.Linear("l", 2, 1)

        def run(self, cx, x):
            raise RuntimeError("run broke")

    with pytest.raises(hf.CallError, match="RuntimeError: run broke"):
        hf.evaluate(Broken(), hf.Theta.init(net), hf.Examples(XOR_X, XOR_Y), "mse")


def test_bad_settings_are_config_errors_that_say_what_to_fix():
    net = hf.Chain([hf.Linear("l", 2, 1)])
    data = hf.Examples(XOR_X, XOR_Y)
    with pytest.raises(hf.ConfigError, match="odd"):
        hf.optimize(net, data, "mse", pop_size=7, progress=False)
    with pytest.raises(hf.ConfigError, match="activation"):
        hf.Linear("l", 2, 1, "swish")
    with pytest.raises(hf.ConfigError, match="metric"):
        hf.evaluate(net, hf.Theta.init(net), data, "f1")
    with pytest.raises(hf.ConfigError, match="shape mismatch"):
        hf.Examples(XOR_X, XOR_Y[:3])
    kept = []

    class Leaky(hf.HyperSystem):
        def __init__(self):
            self.l = hf.Linear("l", 2, 1)

        def run(self, cx, x):
            kept.append(cx)
            return cx.call(self.l, x)

    leaky = Leaky()
    hf.evaluate(leaky, hf.Theta.init(leaky), data, "mse")
    with pytest.raises(hf.ConfigError, match="run that has ended"):
        kept[0].population


def test_optimize_with_a_python_metric_is_reproducible_with_a_seed():
    net = hf.Chain([hf.Linear("l", 2, 1, "sigmoid")])
    data = hf.Examples(XOR_X, XOR_Y)

    def mse(pred, target):
        return float(np.mean((pred - target) ** 2))

    def run(seed):
        return hf.optimize(net, data, mse, pop_size=16, generations=15, seed=seed,
                           minimize=True, progress=False)

    a, b, c = run(7), run(7), run(8)
    assert a.theta.bit_eq(b.theta)
    fitness = lambda r: [(h["best"], h["mean"], h["std"]) for h in r.history]  # noqa: E731
    assert fitness(a) == fitness(b)
    assert not a.theta.bit_eq(c.theta)
    assert a.final_fitness <= a.history[0]["mean"]


def test_another_python_thread_runs_while_optimize_works():
    net = hf.Chain([hf.Linear("hidden", 2, 4, "tanh"), hf.Linear("output", 4, 1, "sigmoid")])
    data = hf.Examples(XOR_X, XOR_Y)
    count = [0]
    started, done = threading.Event(), threading.Event()

    def worker():
        started.set()
        while not done.is_set():
            count[0] += 1
            time.sleep(0.0005)  # releases the GIL between increments

    old = sys.getswitchinterval()
    # The main thread never hands the GIL over by itself now: the worker can only run while
    # the main thread is blocked or inside code that released the GIL.
    sys.setswitchinterval(100.0)
    t = threading.Thread(target=worker)
    try:
        t.start()
        started.wait()
        before = count[0]
        hf.optimize(net, data, "bce", generations=400, pop_size=64, minimize=True,
                    progress=False)
        during = count[0] - before
    finally:
        done.set()
        sys.setswitchinterval(old)
        t.join()
    assert during > 0


def test_report_history_as_dicts_and_pandas():
    net = hf.Chain([hf.Linear("l", 2, 1)])
    report = hf.optimize(net, hf.Examples(XOR_X, XOR_Y), "mse", generations=5, minimize=True,
                         progress=False)
    assert [h["generation"] for h in report.history] == [0, 1, 2, 3, 4]
    assert {"best", "mean", "std", "sigma", "lr", "failed"} <= set(report.history[0])
    assert report.stop == "generations"
    assert report.best_theta is not None and report.best_fitness is not None
    pd = pytest.importorskip("pandas")
    df = report.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 5
    assert list(df["generation"]) == [0, 1, 2, 3, 4]


def test_population_evaluation_and_mlp_and_split():
    net = hf.Chain([hf.Mlp("m", [2, 8, 1], "tanh", "sigmoid", noise_rank=2)])
    data = hf.Examples(XOR_X, XOR_Y)
    t0, t1 = hf.Theta.init(net, 1), hf.Theta.init(net, 2)
    both = hf.evaluate_population(net, [t0, t1], data, "mse")
    assert both == [hf.evaluate(net, t0, data, "mse"), hf.evaluate(net, t1, data, "mse")]
    js = hf.examples([hf.Example(i, i) for i in range(10)])
    train, val = js.split(0.3, 1)
    assert (len(train), len(val)) == (7, 3)


def test_the_readme_xor_example_runs_and_solves_xor(capsys):
    runpy.run_path(str(pathlib.Path(__file__).parent.parent / "examples" / "xor.py"))
    out = capsys.readouterr().out.split()
    assert out[:2] == ["accuracy", "1.0"]
    assert float(out[3]) < 0.05


def test_a_hub_records_the_run_its_generations_and_every_call(tmp_path):
    net = hf.Chain([hf.Linear("l", 2, 1, "sigmoid")])
    hub = hf.Hub()
    hf.optimize(net, hf.Examples(XOR_X, XOR_Y), "bce", pop_size=8, generations=3,
                minimize=True, progress=False, hub=hub)
    records = hub.records()
    kinds = [r["kind"] for r in records]
    assert kinds.count("run") == 1 and kinds.count("generation") == 3
    assert any(r["name"] == "l" and r["kind"] == "tensor" for r in records)
    functions = {f["name"]: f for f in hub.summary()["functions"]}
    assert functions["l"]["calls"] >= 3
    assert "| l |" in hub.summary_markdown()
    path = tmp_path / "trace.jsonl"
    hub.write_jsonl(str(path))
    assert len(path.read_text().splitlines()) == len(hub)
