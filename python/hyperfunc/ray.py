"""Distributed ES on Ray: workers get seeds and pair ranges, and send back fitness scalars.

``optimize_distributed`` starts N Ray actors. Each builds the system once from your factory and
holds θ and the optimiser's state. Each generation goes like this:

1. The driver hands out ranges of antithetic pairs. It uses work-stealing: a worker that
   finishes a range gets the next one, sized to its measured speed.
2. A worker draws its candidates' noise again from (seed, generation, pair), evaluates them with
   the batched engine, and returns the fitness values (4 bytes each).
3. The driver puts the whole fitness vector in Ray's store once. Each worker gets it with its
   next request and applies the same update, so θ is never sent.

Every ``hash_every`` generations the driver compares a hash of θ across the workers. A
difference raises ``DivergenceError``.

If a worker dies, its ranges go to the others. A new worker starts from the last checkpoint and
replays the generations since then from the fitness log (a few floats per candidate). The run
ends with the same θ as a run without the fault.

Fitness values do not depend on how a generation is split. So with the same seed, the final θ
is bit-identical to ``hyperfunc.optimize(..., autotune=False)`` in one process.

Needs Ray: ``pip install 'hyperfunc[ray]'``.
"""

from __future__ import annotations

import math
import pickle
import statistics
import time
from array import array
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import EsWorker, HyperfuncError, Theta

try:  # Ray is an optional extra; importing this module without it must still work (doctests).
    import ray as _ray
except ImportError:  # pragma: no cover - exercised only without the extra
    _ray = None

__all__ = [
    "DivergenceError",
    "DistributedReport",
    "Driver",
    "FactoryError",
    "optimize_distributed",
]


class FactoryError(HyperfuncError):
    """The system factory raised on a worker; the message carries the worker's traceback."""


class DivergenceError(HyperfuncError):
    """Workers that should hold the same θ do not (a hash check failed)."""


@dataclass
class DistributedReport:
    """What ``optimize_distributed`` returns."""

    theta: Theta
    """The final mean θ."""
    final_fitness: float
    """The metric of the final θ on all the examples."""
    best_fitness: Optional[float]
    """The best candidate fitness seen, and the generation it was seen in."""
    best_generation: Optional[int]
    generations: int
    seconds: float
    restarts: int
    """Workers that died and were replaced."""
    bytes_per_generation: float
    """Median bytes of messages per generation (ranges, fitness, broadcasts, hash checks)."""
    checkpoint_bytes: int
    """Bytes of checkpoints pulled from a worker over the run (not per generation)."""
    history: List[Dict[str, Any]] = field(default_factory=list)
    """Per generation: generation, best, mean, seconds, chunks, bytes, workers."""


def _size(obj: Any) -> int:
    """Bytes of a message as pickled."""
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _actor_class():
    @_ray.remote
    class _Worker:
        """A Ray actor around one ``EsWorker``.

        Every call may carry the fitness vectors of generations this worker has not applied
        yet (Ray resolves them from its object store): the update rides on the next request
        instead of costing the driver one more call per worker and generation.
        """

        def __init__(self, factory, examples, metric, es_kwargs, threads):
            self.error = None
            try:
                if threads:
                    from . import set_threads

                    set_threads(threads)
                self.w = EsWorker(factory(), examples, metric, **es_kwargs)
            except BaseException:  # surfaced by ready(), with the traceback
                self.error = traceback.format_exc()

        def ready(self):
            return self.error

        def _catch_up(self, fitness):
            for f in fitness:
                self.w.tell(f)

        def evaluate(self, generation, start, end, *fitness):
            self._catch_up(fitness)
            if self.w.generation != generation:
                raise DivergenceError(
                    f"a worker at generation {self.w.generation} was asked for generation "
                    f"{generation}: the workers drifted apart"
                )
            t0 = time.perf_counter()
            out = self.w.evaluate(generation, start, end)
            return out, time.perf_counter() - t0

        def replay(self, log):
            self.w.replay(log)

        def theta_hash(self, *fitness):
            self._catch_up(fitness)
            return self.w.theta_hash()

        def checkpoint(self, *fitness):
            self._catch_up(fitness)
            return self.w.checkpoint(), self.w.generation

        def restore(self, data):
            self.w.restore(data)

        def theta_bytes(self, *fitness):
            self._catch_up(fitness)
            return self.w.theta.to_bytes()

        def final_fitness(self):
            return self.w.evaluate_theta()

    return _Worker


@dataclass
class Driver:
    """The driver's view of the run, passed to ``on_generation(generation, driver)``."""

    actors: List[Any]
    """The live Ray actor handles, one per worker slot."""
    fitness_log: List[bytes]
    """The fitness vectors (little-endian f32) of the generations since the last checkpoint
    (since the start before the first), oldest first: what a replacement worker replays."""
    log_start: int = 0
    """The generation of ``fitness_log[0]``."""
    checkpoint: Optional[Tuple[bytes, int]] = None
    """The last checkpoint and the generation it holds."""


def optimize_distributed(
    system_factory: Callable[[], Any],
    examples: Any,
    metric: Any,
    *,
    workers: int = 2,
    generations: int = 100,
    pop_size: int = 64,
    sigma: float = 0.1,
    lr: float = 0.05,
    seed: int = 0,
    minimize: bool = False,
    antithetic: bool = True,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    momentum: float = 0.9,
    max_batch_size: int = 262144,
    max_failure_rate: float = 1.0,
    init: Optional[Theta] = None,
    examples_per_eval: Optional[int] = None,
    threads_per_worker: Optional[int] = None,
    cpus_per_worker: float = 1.0,
    chunks_per_worker: int = 2,
    adaptive_ranges: bool = True,
    hash_every: int = 10,
    checkpoint_every: int = 25,
    max_restarts: int = 3,
    on_generation: Optional[Callable[[int, Driver], None]] = None,
) -> DistributedReport:
    """Optimises θ with OpenAI-ES on ``workers`` Ray actors; ES arguments are ``optimize``'s.

    ``system_factory`` builds the system on each worker: a picklable callable, for example a
    class or a module-level function. ``examples`` are sent once to each worker. ``metric`` is a
    metric name or a picklable callable. Ray is started with its defaults when it is not
    running yet.

    Ranges: at most ``chunks_per_worker`` per worker and generation, handed out by
    work-stealing and sized to each worker's measured speed. With ``adaptive_ranges`` the driver
    uses fewer (and fewer workers) when a generation is too small for them: it measures its
    own CPU time per range and keeps it under half of the workers' time.

    ``hash_every``: generations between θ hash checks (and at the end). ``checkpoint_every``:
    generations between checkpoints that a replacement worker starts from (before the first
    one, it replays from generation 0). ``max_restarts``: replacements allowed in the whole run.
    ``on_generation(g, driver)`` runs after each generation's update is sent.
    """
    if _ray is None:
        raise ImportError("hyperfunc.ray needs Ray: pip install 'hyperfunc[ray]'")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if hash_every < 1 or checkpoint_every < 1 or chunks_per_worker < 1:
        raise ValueError("hash_every, checkpoint_every and chunks_per_worker must be at least 1")
    if not _ray.is_initialized():
        _ray.init()
    es_kwargs = dict(
        pop_size=pop_size, sigma=sigma, lr=lr, generations=generations, seed=seed,
        minimize=minimize, antithetic=antithetic, weight_decay=weight_decay,
        optimizer=optimizer, momentum=momentum, max_batch_size=max_batch_size,
        max_failure_rate=max_failure_rate, init=init, examples_per_eval=examples_per_eval,
    )
    if antithetic and pop_size % 2:
        raise ValueError(f"pop_size must be even with antithetic pairs, got {pop_size}")
    pairs, per = (pop_size // 2, 2) if antithetic else (pop_size, 1)

    cls = _actor_class().options(num_cpus=cpus_per_worker)

    def spawn() -> Any:
        return cls.remote(system_factory, examples, metric, es_kwargs, threads_per_worker)

    def check_ready(actors: List[Any]) -> None:
        for i, err in enumerate(_ray.get([a.ready.remote() for a in actors])):
            if err is not None:
                raise FactoryError(
                    f"worker {i} could not start: the system factory or the settings raised "
                    f"there:\n{err}"
                )

    driver = Driver(actors=[spawn() for _ in range(workers)], fitness_log=[])
    check_ready(driver.actors)
    rates = [0.0] * workers  # pairs per second of each worker, measured inside the workers
    told = [0] * workers  # generations each worker has applied (or been sent)
    refs: Dict[int, Any] = {}  # generation -> its fitness vector in Ray's store
    range_cpu: Optional[float] = None  # the driver's CPU seconds per range, measured
    restarts, ckpt_bytes = 0, 0
    history: List[Dict[str, Any]] = []
    best: Optional[Tuple[float, int]] = None
    t_start = time.perf_counter()
    dead_error = (_ray.exceptions.RayActorError,)

    def done() -> int:
        """Generations whose fitness is known."""
        return driver.log_start + len(driver.fitness_log)

    def owed(slot: int) -> List[Any]:
        """The fitness refs worker `slot` has not had yet; from now on it has them."""
        out = [refs[k] for k in range(told[slot], done())]
        told[slot] = done()
        return out

    def replace(slot: int) -> None:
        nonlocal restarts
        restarts += 1
        if restarts > max_restarts:
            raise HyperfuncError(
                f"{restarts} workers died, more than max_restarts={max_restarts}; the last "
                f"was worker {slot}"
            )
        a = spawn()
        check_ready([a])
        if driver.checkpoint is not None:
            data, g0 = driver.checkpoint
            a.restore.remote(data)
        else:
            g0 = 0
        if done() > g0:
            a.replay.remote(driver.fitness_log[g0 - driver.log_start :])
        driver.actors[slot] = a
        told[slot] = done()
        rates[slot] = 0.0

    def call(slot: int, method: str) -> Any:
        """A synchronous call that brings the worker up to date first; replaces a dead one."""
        for _ in range(2):
            try:
                return _ray.get(getattr(driver.actors[slot], method).remote(*owed(slot)))
            except dead_error:
                replace(slot)
        raise HyperfuncError(f"worker {slot} died twice in a row during {method}")

    for g in range(generations):
        t0 = time.perf_counter()
        fitness = bytearray(4 * pairs * per)
        sent = 0
        # How many ranges: at most chunks_per_worker per worker, and few enough that the
        # driver's own time (range_cpu each) stays under half of the workers' time.
        known = [r for r in rates if r > 0]
        n_ranges = chunks_per_worker * workers
        if adaptive_ranges and range_cpu and known:
            work = pairs / statistics.mean(known)  # seconds of one worker for the generation
            fit = int(math.sqrt(0.5 * work / range_cpu))
            n_ranges = max(1, min(n_ranges, fit if fit < workers else fit // workers * workers))
        order = sorted(range(workers), key=lambda k: -rates[k])
        users = order[: min(workers, n_ranges)]
        speed = {k: rates[k] if rates[k] > 0 else 1.0 for k in users}
        total = sum(speed.values())
        sizes = {
            k: max(1, round(pairs * speed[k] / total * len(users) / n_ranges)) for k in users
        }
        next_pair = 0
        retry: List[Tuple[int, int]] = []
        inflight: Dict[Any, Tuple[int, int, int]] = {}
        alive = set(range(workers))
        done_pairs, busy = [0] * workers, [0.0] * workers

        def take(slot: int) -> Optional[Tuple[int, int]]:
            nonlocal next_pair
            if retry:
                return retry.pop()
            if next_pair >= pairs:
                return None
            end = min(pairs, next_pair + sizes.get(slot, max(sizes.values())))
            r = (next_pair, end)
            next_pair = end
            return r

        def submit(slot: int) -> bool:
            nonlocal sent
            r = take(slot)
            if r is None:
                return False
            args = (g, r[0], r[1], *owed(slot))
            sent += _size((g, r[0], r[1])) + 4 * pairs * per * (len(args) - 3)
            inflight[driver.actors[slot].evaluate.remote(*args)] = (slot, r[0], r[1])
            return True

        c0 = time.process_time()
        # Two ranges in flight per worker hide the round trip. Handed out round-robin, so
        # every user gets a range even when one worker measured far faster than the others.
        for _ in range(2):
            for slot in users:
                submit(slot)
        chunks = 0
        while inflight:
            ready, _ = _ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            slot, s, e = inflight.pop(ref)
            try:
                out, secs = _ray.get(ref)
            except dead_error:
                # The worker is gone: its ranges go back to the queue for the others.
                if slot in alive:
                    alive.discard(slot)
                    for k in [k for k, v in inflight.items() if v[0] == slot]:
                        _, s2, e2 = inflight.pop(k)
                        retry.append((s2, e2))
                retry.append((s, e))
                if not alive:
                    replace(slot)
                    alive.add(slot)
                for other in sorted(alive, key=lambda k: -rates[k]):
                    while sum(1 for v in inflight.values() if v[0] == other) < 2:
                        if not submit(other):
                            break
                continue
            sent += _size((out, secs))
            fitness[s * per * 4 : e * per * 4] = out
            done_pairs[slot] += e - s
            busy[slot] += secs
            chunks += 1
            submit(slot)
        cpu = (time.process_time() - c0) / max(1, chunks)
        range_cpu = cpu if range_cpu is None else 0.5 * (range_cpu + cpu)
        for slot in range(workers):
            if done_pairs[slot] and busy[slot] > 0:
                rates[slot] = done_pairs[slot] / busy[slot]
        data = bytes(fitness)
        driver.fitness_log.append(data)
        # The update: one object in Ray's store; each worker gets it with its next request.
        refs[g] = _ray.put(data)
        for slot in range(workers):
            if slot not in alive:
                replace(slot)
        if (g + 1) % hash_every == 0 or g + 1 == generations:
            sent += sum(4 * pairs * per * (done() - told[k]) for k in range(workers))
            hashes = [call(k, "theta_hash") for k in range(workers)]
            sent += sum(_size(h) for h in hashes)
            if len(set(hashes)) > 1:
                raise DivergenceError(
                    f"after generation {g}, workers hold different θ: hashes "
                    + ", ".join(f"worker {i}: {h:016x}" for i, h in enumerate(hashes))
                )
        if (g + 1) % checkpoint_every == 0 and g + 1 < generations:
            data_ck, g_ck = call(0, "checkpoint")
            ckpt_bytes += len(data_ck)
            driver.checkpoint = (data_ck, g_ck)
            # A replacement starts here now: the fitness before it is no longer needed.
            del driver.fitness_log[: g_ck - driver.log_start]
            driver.log_start = g_ck
        for k in [k for k in refs if k < min(told)]:
            del refs[k]  # every worker has it: Ray may free it
        values = [v for v in array("f", data) if math.isfinite(v)]
        gen_best = (min(values) if minimize else max(values)) if values else None
        if gen_best is not None and (
            best is None or (gen_best < best[0] if minimize else gen_best > best[0])
        ):
            best = (gen_best, g)
        history.append(
            dict(
                generation=g,
                best=gen_best,
                mean=sum(values) / len(values) if values else math.nan,
                seconds=time.perf_counter() - t0,
                chunks=chunks,
                bytes=sent,
                workers=len(users),
            )
        )
        if on_generation is not None:
            on_generation(g, driver)

    theta = Theta.from_bytes(call(0, "theta_bytes"))
    final = _ray.get(driver.actors[0].final_fitness.remote())
    per_gen = sorted(h["bytes"] for h in history)
    return DistributedReport(
        theta=theta,
        final_fitness=final,
        best_fitness=best[0] if best else None,
        best_generation=best[1] if best else None,
        generations=len(history),
        seconds=time.perf_counter() - t_start,
        restarts=restarts,
        bytes_per_generation=per_gen[len(per_gen) // 2] if per_gen else 0.0,
        checkpoint_bytes=ckpt_bytes,
        history=history,
    )
