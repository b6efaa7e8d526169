"""Distributed ES on Ray, Task B at P = 1024: generations per second with 1 and 2 actors, and
bytes per generation, beside the single-process run. Prints one JSON document.

    python python/benches/ray_bench.py [--generations 12] [--out ray_bench.json]

Starts a local Ray cluster (`ray.init(num_cpus=<cores>)`). On a machine with C cores, each of
A actors gets C/A threads, so 1 and 2 actors use the same cores.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import ray

sys.path.insert(0, os.path.dirname(__file__))
import taskb  # noqa: E402

import hyperfunc as hf  # noqa: E402
from hyperfunc.ray import optimize_distributed  # noqa: E402

ray.cloudpickle.register_pickle_by_value(taskb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--pop", type=int, default=1024)
    ap.add_argument("--out")
    a = ap.parse_args()
    taskb.check_generator()
    cores = os.cpu_count() or 1
    examples, theta0 = taskb.data()
    es = dict(pop_size=a.pop, sigma=0.05, lr=0.05, seed=1, minimize=True, init=theta0,
              generations=a.generations)

    t0 = time.perf_counter()
    rep = hf.optimize(taskb.system(), examples, "cross_entropy", progress=False,
                      autotune=False, **es)
    # The report's seconds are since the start: a generation's time is the difference.
    ends = [h["seconds"] for h in rep.history]
    single_s = [b - a for a, b in zip([0.0] + ends, ends)]
    single = dict(
        gens_per_sec=1.0 / statistics.median(single_s[1:] or single_s),
        wall_s=time.perf_counter() - t0,
    )

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=cores, include_dashboard=False, object_store_memory=200 * 1024 * 1024)
    runs = {}
    for workers in (1, 2):
        threads = max(1, cores // workers)
        out = optimize_distributed(
            taskb.system, examples, "cross_entropy", workers=workers,
            threads_per_worker=threads, cpus_per_worker=cores / workers, **es)
        secs = [h["seconds"] for h in out.history]
        runs[str(workers)] = dict(
            gens_per_sec=1.0 / statistics.median(secs[1:] or secs),
            bytes_per_generation=out.bytes_per_generation,
            bytes_per_candidate=out.bytes_per_generation / a.pop,
            threads_per_worker=threads,
            same_theta_as_single=out.theta.bit_eq(rep.theta),
        )
    ray.shutdown()
    doc = dict(
        machine=dict(cores=cores, cpu=platform.processor() or platform.machine(),
                     python=platform.python_version(), ray=ray.__version__),
        task="B", pop=a.pop, generations=a.generations,
        single_process=single, actors=runs,
        ratio_2_vs_1=runs["2"]["gens_per_sec"] / runs["1"]["gens_per_sec"],
        ratio_1_vs_single=runs["1"]["gens_per_sec"] / single["gens_per_sec"],
    )
    taskb.emit(doc, a.out)


if __name__ == "__main__":
    main()
