"""Runs from Python: a recorded optimisation, live control from another thread, resume."""

import threading
import time

import numpy as np
import pytest

import hyperfunc as hf


def xor():
    net = hf.Chain([hf.Linear("hidden", 2, 4, "tanh"), hf.Linear("output", 4, 1, "sigmoid")])
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([[0], [1], [1], [0]], dtype=np.float32)
    return net, hf.Examples(x, y)


def test_recorded_run_and_scheduled_command(tmp_path):
    net, data = xor()
    store = hf.RunStore(str(tmp_path))
    r = hf.optimize(net, data, "bce", minimize=True, lr=0.1, generations=30, seed=3,
                    progress=False, store=str(tmp_path), checkpoint_every=5)
    assert r.run == 1
    assert len(store.generations(1)) == 30
    assert store.info(1)["status"] == "finished"
    assert store.theta(1).names() == r.theta.names()
    # A finished run takes no commands, and says why.
    with pytest.raises(hf.ConfigError, match="finished"):
        store.control(1).set(lr=0.2)


def test_control_from_another_thread(tmp_path):
    net, data = xor()
    store = hf.RunStore(str(tmp_path))
    out = {}

    def train():
        out["report"] = hf.optimize(net, data, "bce", minimize=True, lr=0.1,
                                    generations=10_000_000, seed=3, progress=False,
                                    store=str(tmp_path))

    t = threading.Thread(target=train)
    t.start()
    deadline = time.monotonic() + 60
    while not store.list() or store.info(1)["generation"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    ctl = store.control(1)
    with pytest.raises(hf.ConfigError, match="even"):
        ctl.set(pop_size=63)
    with pytest.raises(hf.ConfigError, match="restart-only"):
        ctl.set(seed=1)
    cmd = ctl.set(lr=0.02, sigma=0.05)
    while not any(c["id"] == cmd and c["status"] == "applied" for c in store.commands(1)):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    ctl.stop()
    t.join(60)
    assert not t.is_alive()
    report = out["report"]
    assert report.stop == "command"
    rows = store.generations(1)
    assert rows[-1]["lr"] == 0.02 and rows[-1]["sigma"] == 0.05
    assert any("lr 0.1 → 0.02" in e["message"] and "from python" in e["message"]
               for e in store.events(1))
    assert store.effective_config(1)["lr"] == 0.02
    # Continuing the stopped run with other settings is refused with the differences named.
    with pytest.raises(hf.ConfigError, match="seed: 3 → 4"):
        hf.optimize(net, data, "bce", minimize=True, lr=0.1, generations=10_000_000, seed=4,
                    progress=False, store=str(tmp_path), run=1)


def test_datasets_evaluations_and_comparison(tmp_path):
    net, data = xor()
    store = hf.RunStore(str(tmp_path))
    for seed in (1, 2):
        hf.optimize(net, data, "bce", minimize=True, generations=5, seed=seed, progress=False,
                    store=str(tmp_path))
    items = [{"id": f"q{i}", "input": i, "expected": 2 * i} for i in range(20)]
    v = store.put_dataset("double", items)
    assert (v["version"], v["items"]) == (1, 20)
    assert store.put_dataset("double", items) == v
    lines = "\n".join('{"input": %d, "expected": %d}' % (i, 3 * i) for i in range(5))
    assert store.put_dataset("triple", lines)["items"] == 5
    good = {f"q{i}": 1.0 for i in range(20)}
    worse = {f"q{i}": float(i % 2) for i in range(20)}
    assert store.record_eval(1, "double", good, metric="accuracy") == 1.0
    assert store.record_eval(2, "double", worse, metric="accuracy") == 0.5
    c = store.compare(1, 2, "accuracy")
    assert c["paired"] == 20 and c["diff"] == -0.5 and c["ci95"][1] < 0
    with pytest.raises(hf.ConfigError, match="no `f1` evaluation"):
        store.compare(1, 2, "f1")
    with pytest.raises(hf.ConfigError, match="line 1"):
        store.put_dataset("bad", '{"input": 1}')
