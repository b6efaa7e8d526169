"""Is the driver the bottleneck at 64 actors? A simulation from costs measured here.

    python python/benches/ray_sim.py [--actors 64] [--out ray_sim.json]

What it measures on this machine (a local Ray cluster, real actors):
- the driver's CPU time per range it hands out and collects back (submit, wait, get, copy),
  with no-op actors that return as many fitness bytes as a real range;
- the driver's CPU time to put one generation's fitness vector in Ray's store and to send the
  `tell` to each actor;
- one worker's time per antithetic pair on Task B (`EsWorker.evaluate`, 256 rows), on one
  thread.

What it computes for A actors and P up to 65,536: with `chunks_per_worker` = 4 ranges per actor
per generation, the driver's busy time per generation is
`4·A·range_cost + put(4P) + A·tell_cost`, and the actors' time is `(P/2)·pair_cost / A`. The
driver is not the bottleneck while its busy time is well below the actors' time: the JSON gives
the ratio (driver utilisation) per P.
"""

import argparse
import os
import statistics
import sys
import time

import ray

sys.path.insert(0, os.path.dirname(__file__))
import taskb  # noqa: E402

import hyperfunc as hf  # noqa: E402


@ray.remote(num_cpus=0.5)
class Echo:
    """Answers a range request with that many fitness bytes, doing nothing else."""

    def evaluate(self, g, start, end):
        return bytes(8 * (end - start)), 0.0

    def tell(self, fitness):
        return None


def driver_costs(pairs_per_range: int, rounds: int = 400):
    actors = [Echo.remote() for _ in range(2)]
    ray.get([a.tell.remote(b"") for a in actors])
    buf = bytearray(8 * pairs_per_range * rounds)
    c0 = time.process_time()
    inflight = {}
    for i in range(rounds):
        a = actors[i % 2]
        inflight[a.evaluate.remote(0, i * pairs_per_range, (i + 1) * pairs_per_range)] = i
        if len(inflight) >= 4:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            j = inflight.pop(ready[0])
            out, _ = ray.get(ready[0])
            buf[8 * j * pairs_per_range : 8 * (j + 1) * pairs_per_range] = out
    for ref, j in inflight.items():
        out, _ = ray.get(ref)
        buf[8 * j * pairs_per_range : 8 * (j + 1) * pairs_per_range] = out
    per_range = (time.process_time() - c0) / rounds
    tells = []
    for p in (1024, 65536):
        data = bytes(4 * p)
        c0 = time.process_time()
        for _ in range(20):
            ref = ray.put(data)
            ray.get([a.tell.remote(ref) for a in actors])
        tells.append((p, (time.process_time() - c0) / 20 / 2))
    return per_range, tells


def pair_cost() -> float:
    examples, theta0 = taskb.data()
    w = hf.EsWorker(taskb.system(), examples, "cross_entropy", pop_size=1024, sigma=0.05,
                    minimize=True, init=theta0)
    w.evaluate(0, 0, 64)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        w.evaluate(0, 0, 512)
        times.append((time.perf_counter() - t0) / 512)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, default=64)
    ap.add_argument("--out")
    a = ap.parse_args()
    hf.set_threads(1)
    pc = pair_cost()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024)
    per_range, tells = driver_costs(pairs_per_range=128)
    ray.shutdown()
    # The tell cost per actor, interpolated linearly in P between the two measured sizes.
    (p1, t1), (p2, t2) = tells
    rows = []
    for p in (1024, 4096, 16384, 65536):
        tell = t1 + (t2 - t1) * (p - p1) / (p2 - p1)
        driver = 4 * a.actors * per_range + a.actors * tell
        actors = (p // 2) * pc / a.actors
        rows.append(dict(pop=p, driver_ms=1e3 * driver, actors_ms=1e3 * actors,
                         driver_utilisation=driver / actors,
                         generations_per_sec=1.0 / max(driver, actors)))
    doc = dict(actors=a.actors, measured=dict(
        pair_cost_us=1e6 * pc, driver_per_range_us=1e6 * per_range,
        driver_tell_us_per_actor={str(p): 1e6 * t for p, t in tells}), simulated=rows)
    taskb.emit(doc, a.out)


if __name__ == "__main__":
    main()
