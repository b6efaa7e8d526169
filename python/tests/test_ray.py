"""Distributed ES on a real local Ray cluster (ray.init(num_cpus=2) in this process)."""

import os
import pickle
import sys

import numpy as np
import pytest

import ray

import hyperfunc as hf
from hyperfunc.ray import DivergenceError, FactoryError, optimize_distributed

# Workers unpickle the factories below: send this module's code along with them.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROWS, CLASSES = 96, 5


def data():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((ROWS, 12)).astype(np.float32)
    y = (np.arange(ROWS) % CLASSES).astype(np.float32).reshape(-1, 1)
    return hf.Examples(x, y)


def dense_net():
    return hf.Chain([hf.Mlp("mlp", [12, 16, CLASSES], "tanh")])


def low_rank_net():
    return hf.Chain([hf.Mlp("mlp", [12, 16, CLASSES], "tanh", noise_rank=1)])


def bad_factory():
    raise RuntimeError("no weights file at /nowhere/weights.safetensors")


ES = dict(pop_size=32, sigma=0.05, lr=0.05, seed=5, minimize=True)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 * 1024)
    yield
    ray.shutdown()


def single(factory, generations, **kw):
    es = {**ES, **kw}
    return hf.optimize(factory(), data(), "cross_entropy", generations=generations,
                       progress=False, autotune=False, **es)


def test_theta_and_examples_survive_pickling():
    theta = hf.Theta.init(dense_net(), 1)
    assert pickle.loads(pickle.dumps(theta)).bit_eq(theta)
    d = pickle.loads(pickle.dumps(data()))
    assert len(d) == ROWS
    assert hf.evaluate(dense_net(), theta, d, "cross_entropy") == hf.evaluate(
        dense_net(), theta, data(), "cross_entropy")
    j = pickle.loads(pickle.dumps(hf.Examples.json(["a", {"b": 1}], [1, None])))
    assert len(j) == 2
    with pytest.raises(hf.ConfigError, match="Examples::to_bytes"):
        hf.Examples.from_bytes(b"not examples")


def test_two_actors_reach_the_single_process_theta_bit_for_bit():
    ref = single(dense_net, 6)
    out = optimize_distributed(dense_net, data(), "cross_entropy", workers=2, generations=6,
                               hash_every=2, adaptive_ranges=False, **ES)
    assert out.theta.bit_eq(ref.theta)
    assert [h["best"] for h in out.history] == [h["best"] for h in ref.history]
    assert out.final_fitness == ref.final_fitness
    assert out.restarts == 0
    # Both workers took ranges, two each.
    assert all(h["chunks"] == 4 and h["workers"] == 2 for h in out.history)
    # The driver may use fewer ranges for so small a problem; θ is the same.
    auto = optimize_distributed(dense_net, data(), "cross_entropy", workers=2, generations=6, **ES)
    assert auto.theta.bit_eq(ref.theta)


def test_bytes_per_generation_grow_with_p_at_most_16_bytes_per_candidate():
    sizes = {}
    for p in (32, 256):
        out = optimize_distributed(dense_net, data(), "cross_entropy", workers=2, generations=3,
                                   adaptive_ranges=False, **{**ES, "pop_size": p})
        assert out.bytes_per_generation <= 16 * p + 4096, (p, out.bytes_per_generation)
        sizes[p] = out.bytes_per_generation
    slope = (sizes[256] - sizes[32]) / (256 - 32)
    assert 4 <= slope <= 16, sizes


def test_a_killed_actor_is_replaced_and_the_run_ends_with_the_same_theta():
    ref = single(low_rank_net, 8)
    killed, logged = [], []

    def kill(g, driver):
        logged.append(len(driver.fitness_log))
        if g == 2:
            killed.append(driver.actors[1])
            ray.kill(driver.actors[1])

    out = optimize_distributed(low_rank_net, data(), "cross_entropy", workers=2, generations=8,
                               checkpoint_every=2, hash_every=1, on_generation=kill,
                               adaptive_ranges=False, **ES)
    assert killed
    assert out.restarts == 1
    assert out.theta.bit_eq(ref.theta)
    assert out.checkpoint_bytes > 0
    # The driver keeps only the fitness since the last checkpoint.
    assert max(logged) <= 2 and len(logged) == 8


def test_a_factory_that_raises_surfaces_its_traceback():
    with pytest.raises(FactoryError) as e:
        optimize_distributed(bad_factory, data(), "cross_entropy", workers=2, generations=2, **ES)
    msg = str(e.value)
    assert "Traceback" in msg and "bad_factory" in msg
    assert "no weights file at /nowhere/weights.safetensors" in msg


def test_wrong_settings_are_refused_before_any_worker_starts():
    with pytest.raises(ValueError, match="even"):
        optimize_distributed(dense_net, data(), "cross_entropy", workers=2, generations=2,
                             **{**ES, "pop_size": 31})
    with pytest.raises(ValueError, match="workers"):
        optimize_distributed(dense_net, data(), "cross_entropy", workers=0, generations=2, **ES)


def other_run_state(at):
    """The state of another run (another seed) after `at` generations: taken in the last
    generation's callback, after the final hash check brought the worker up to date."""
    got = {}

    def grab(g, driver):
        if g == at - 1:
            got["ckpt"] = ray.get(driver.actors[0].checkpoint.remote())[0]

    optimize_distributed(dense_net, data(), "cross_entropy", workers=1, generations=at,
                         on_generation=grab, **{**ES, "seed": 99})
    return got["ckpt"]


@pytest.mark.parametrize("at,message", [(2, "after generation 3, workers hold different θ"),
                                        (3, "at generation 4 was asked for generation 3")])
def test_workers_that_drift_apart_raise_a_divergence_error(at, message):
    # at=3: worker 1 is one generation ahead, and its next range request says so. That needs
    # worker 1 to get a range in generation 3 however slow it measured: ranges go round-robin.
    ckpt = other_run_state(at)

    def corrupt(g, driver):
        if g == 2:  # worker 1 takes another run's state
            ray.get(driver.actors[1].restore.remote(ckpt))

    with pytest.raises(DivergenceError, match=message):
        optimize_distributed(dense_net, data(), "cross_entropy", workers=2, generations=6,
                             hash_every=2, on_generation=corrupt, adaptive_ranges=False, **ES)
