"""Is the driver the bottleneck at 64 actors? A simulation from costs measured here.

    python python/benches/ray_sim.py [--actors 64] [--out ray_sim.json]

What it measures on this machine (a local Ray cluster, real actors):
- the driver's CPU time per range it hands out and collects back (submit, wait, get, copy),
  with no-op actors that return as many fitness bytes as a real range, every other request
  carrying the previous generation's fitness as a Ray object (as the real driver sends it);
- the driver's CPU time to put one generation's fitness vector in Ray's store;
- one worker's time per antithetic pair on Task B (`EsWorker.evaluate`, 256 rows), on one
  thread.

What it computes for A actors and P up to 65,536, with the driver's rule
(`optimize_distributed(adaptive_ranges=True)`): R ranges per generation, at most 2 per actor,
and R·range_cost ≤ half the actors' time (R = ⌊√(work / (2·range_cost))⌋, a multiple of A
once it reaches A). The driver's busy time is `R·range_cost + put(4P)`; the actors' time is
`work / min(R, A)`, with work = (P/2)·pair_cost. A generation takes the larger of the two. The
JSON gives, per P, the ranges and actors used, the driver's utilisation, generations per second,
and the speed-up over one actor; the same with a fixed 2 ranges per actor, for comparison.
"""

import argparse
import math
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

    def evaluate(self, g, start, end, *fitness):
        return bytes(8 * (end - start)), 0.0


def driver_costs(pairs_per_range: int, pop: int, rounds: int = 400):
    actors = [Echo.remote() for _ in range(2)]
    ray.get([a.evaluate.remote(0, 0, 1) for a in actors])
    prev = ray.put(bytes(4 * pop))
    buf = bytearray(8 * pairs_per_range * rounds)
    c0 = time.process_time()
    inflight = {}
    for i in range(rounds):
        a = actors[i % 2]
        extra = (prev,) if i % 4 < 2 else ()
        lo, hi = i * pairs_per_range, (i + 1) * pairs_per_range
        inflight[a.evaluate.remote(0, lo, hi, *extra)] = i
        if len(inflight) >= 4:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            j = inflight.pop(ready[0])
            out, _ = ray.get(ready[0])
            buf[8 * j * pairs_per_range : 8 * (j + 1) * pairs_per_range] = out
    for ref, j in inflight.items():
        out, _ = ray.get(ref)
        buf[8 * j * pairs_per_range : 8 * (j + 1) * pairs_per_range] = out
    per_range = (time.process_time() - c0) / rounds
    puts = {}
    for p in (1024, 65536):
        data = bytes(4 * p)
        c0 = time.process_time()
        for _ in range(50):
            ray.put(data)
        puts[p] = (time.process_time() - c0) / 50
    return per_range, puts


def plan(pairs: int, actors: int, pair_s: float, range_s: float, adaptive: bool):
    work = pairs * pair_s
    r = 2 * actors
    if adaptive:
        fit = int(math.sqrt(0.5 * work / range_s))
        r = max(1, min(r, fit if fit < actors else fit // actors * actors))
    used = min(actors, r)
    return r, used, work, work / used


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
    per_range, puts = driver_costs(pairs_per_range=128, pop=65536)
    ray.shutdown()
    (p1, t1), (p2, t2) = sorted(puts.items())
    rows = []
    for p in (1024, 4096, 16384, 65536):
        put = t1 + (t2 - t1) * (p - p1) / (p2 - p1)
        row = dict(pop=p)
        for name, adaptive in (("adaptive", True), ("fixed_2_per_actor", False)):
            r, used, work, actors_s = plan(p // 2, a.actors, pc, per_range, adaptive)
            driver = r * per_range + put
            gen = max(driver, actors_s)
            row[name] = dict(ranges=r, actors_used=used, driver_ms=1e3 * driver,
                             actors_ms=1e3 * actors_s, driver_utilisation=driver / gen,
                             generations_per_sec=1.0 / gen, speedup_vs_one_actor=work / gen)
        rows.append(row)
    doc = dict(actors=a.actors, measured=dict(
        pair_cost_us=1e6 * pc, driver_per_range_us=1e6 * per_range,
        driver_put_us={str(p): 1e6 * t for p, t in puts.items()}), simulated=rows)
    taskb.emit(doc, a.out)


if __name__ == "__main__":
    main()
