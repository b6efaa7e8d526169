"""hyperfunc: train compound AI systems without backpropagation.

Write the system as ordinary Python: hyperfunctions (Rust tensor layers, Python callables,
``async def`` functions) called through a context ``cx``; mark what is learnable; optimise
everything against one metric with evolution strategies. The engine runs in Rust with the GIL
released.

>>> import numpy as np, hyperfunc as hf
>>> net = hf.Chain([hf.Linear("hidden", 2, 4, "tanh", noise_rank=2),
...                 hf.Linear("output", 4, 1, "sigmoid")])
>>> x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
>>> y = np.array([[0], [1], [1], [0]], dtype=np.float32)
>>> data = hf.Examples(x, y)
>>> report = hf.optimize(net, data, "bce", minimize=True, lr=0.1, generations=300,
...                      seed=42, progress=False)
>>> hf.evaluate(net, report.theta, data, "accuracy")
1.0
"""

from dataclasses import dataclass
from typing import Any, List, Sequence

from ._hyperfunc import (
    CallError,
    Chain,
    ConfigError,
    Cx,
    EsWorker,
    Examples,
    HyperFn,
    HyperfuncError,
    Hub,
    Linear,
    LlmClient,
    LmParams,
    Mlp,
    ParamSpec,
    Report,
    RunStore,
    Control,
    Scorer,
    Signature,
    Theta,
    Value,
    __version__,
    evaluate,
    evaluate_population,
    function,
    llm,
    optimize,
    optimize_prompts,
    predict,
    set_threads,
    tensor,
)
from ._ledger import Ledger, Meter
from ._tune import Outcome, Tuner, default_tuner, tune

__all__ = [
    "CallError",
    "Chain",
    "ConfigError",
    "Cx",
    "EsWorker",
    "Example",
    "Examples",
    "HyperFn",
    "HyperSystem",
    "HyperfuncError",
    "Hub",
    "Linear",
    "Ledger",
    "LlmClient",
    "LmParams",
    "Meter",
    "Mlp",
    "Outcome",
    "ParamSpec",
    "Report",
    "RunStore",
    "Control",
    "Scorer",
    "Signature",
    "Theta",
    "Tuner",
    "Value",
    "__version__",
    "default_tuner",
    "evaluate",
    "evaluate_population",
    "examples",
    "function",
    "llm",
    "optimize",
    "optimize_prompts",
    "predict",
    "set_threads",
    "tensor",
    "tune",
]


class HyperSystem:
    """Base class of a system written in Python.

    Subclass it, keep hyperfunctions as attributes, and write ``run(cx, x)``: call them with
    ``cx.call(fn, value)`` and return the last value. ``hyperfunctions()`` finds every
    ``HyperFn`` attribute (in definition order); override it to choose yourself.

    The engine calls ``run`` once per chunk of candidates with every value carrying the
    population axis, so control flow must not depend on a candidate's values.
    """

    def hyperfunctions(self) -> List[HyperFn]:
        return [v for v in vars(self).values() if isinstance(v, HyperFn)]

    def run(self, cx: Cx, x: Value) -> Value:  # pragma: no cover - abstract
        raise NotImplementedError("a HyperSystem subclass must define run(cx, x)")


@dataclass(frozen=True)
class Example:
    """One input and its expected output (JSON-like values)."""

    input: Any
    target: Any


def examples(items: Sequence[Example]) -> Examples:
    """JSON examples from a list of ``Example``."""
    return Examples.json([e.input for e in items], [e.target for e in items])
