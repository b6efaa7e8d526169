"""Tuned calls: choices (models, prompts, strategies) learned by bandits, every call recorded.

>>> import hyperfunc as hf
>>> tuner = hf.Tuner(":memory:", seed=7)
>>> @tuner.tune("classify", choices=["small", "large"], context="badge-type")
... def classify(text, *, choice):
...     return choice == "large"
>>> for _ in range(100):
...     answer, outcome = classify.with_outcome("hello")
...     outcome.reward(1.0 if answer else 0.0)
>>> tuner.report("classify")["groups"][0]["winner"]
'large'
"""

import functools
import inspect
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._hyperfunc import Outcome, TuneCore

__all__ = ["Outcome", "Tuner", "default_tuner", "tune"]

_getframe = sys._getframe
# (file, qualified function name) per code object of a calling frame.
_sites: Dict[Any, Tuple[str, str]] = {}


def _site(code: Any) -> Tuple[str, str]:
    site = (code.co_filename, getattr(code, "co_qualname", code.co_name))
    _sites[code] = site
    return site


def _mark_coroutine(f: Callable[..., Any]) -> Callable[..., Any]:
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python ≥ 3.12
    if mark is not None:
        return mark(f)
    try:  # Python < 3.12: what asyncio.iscoroutinefunction looks for
        import asyncio.coroutines as c

        f._is_coroutine = c._is_coroutine  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover
        pass
    return f


class Tuner:
    """A tune store (SQLite) and its policy settings; decorate functions with ``tune``.

    ``path`` is a file (created if missing; several processes may share it) or ``":memory:"``.
    ``seed`` makes the decisions reproducible. ``policy`` is ``"thompson"`` (default),
    ``"ucb1"``, ``("epsilon_greedy", ε)`` or ``("fixed", "name")``; ``objective`` is
    ``"quality"`` (default), ``("quality_minus_cost", λ)`` (λ reward per dollar) or
    ``("cost_cap", dollars)`` (best quality with mean cost ≤ dollars).

    Records are buffered and written in batches by a background thread, by ``flush()``, by
    ``report()`` and when the tuner is garbage-collected. A file that is not a tune store
    raises ``HyperfuncError`` and is left untouched.

    Every call records its Python call site, ``file:function:line`` (file and function cached
    per code object), in the store's ``caller`` column; ``Outcome.caller`` gives it as a tuple.
    """

    def __init__(
        self,
        path: str = ":memory:",
        *,
        seed: Optional[int] = None,
        policy: Any = None,
        objective: Any = None,
    ) -> None:
        self._core = TuneCore(str(path), seed=seed, policy=policy, objective=objective)

    def tune(
        self,
        label: str,
        *,
        choices: Optional[Sequence[str]] = None,
        context: str = "",
        policy: Any = None,
        objective: Any = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorates a sync or ``async def`` function as a tuned call named ``label``.

        Each call picks one of ``choices`` (``["default"]`` when not given) with the policy and
        passes its name as the keyword argument ``choice``; statistics are kept per
        ``context``. The decorated function returns the function's value; its
        ``with_outcome(...)`` returns ``(value, Outcome)`` (awaitable for ``async def``), and
        ``Outcome.reward(r)`` / ``Outcome.cost(usd)`` report how the call went. An exception of
        the function propagates unchanged and the call counts as failed (reward 0). An
        ``async def`` is awaited in the caller's event loop; a cancelled one records nothing.

        Bad settings (empty or repeated choices, a fixed choice that is not among them, an
        unknown policy) raise ``ConfigError`` here, not at the first call.
        """
        spec = self._core.spec(
            label, list(choices) if choices is not None else None, context, policy, objective
        )

        def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
            run = spec.run
            if inspect.iscoroutinefunction(func):
                start = spec.start

                async def go(args: Tuple[Any, ...], kwargs: Dict[str, Any], site: Any,
                             line: int, with_outcome: bool) -> Any:
                    pending = start(site, line)
                    kwargs["choice"] = pending.choice
                    try:
                        value = await func(*args, **kwargs)
                    except Exception as e:
                        pending.finish(f"{type(e).__qualname__}: {e}")
                        raise
                    except BaseException:
                        pending.abandon()
                        raise
                    outcome = pending.finish()
                    return (value, outcome) if with_outcome else value

                @functools.wraps(func)
                def awrapper(*args: Any, **kwargs: Any) -> Any:
                    f = _getframe(1)
                    code = f.f_code
                    return go(args, kwargs, _sites.get(code) or _site(code), f.f_lineno, False)

                def awith_outcome(*args: Any, **kwargs: Any) -> Any:
                    f = _getframe(1)
                    code = f.f_code
                    return go(args, kwargs, _sites.get(code) or _site(code), f.f_lineno, True)

                awrapper.with_outcome = awith_outcome  # type: ignore[attr-defined]
                awrapper.tune_label = label  # type: ignore[attr-defined]
                return _mark_coroutine(awrapper)

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                f = _getframe(1)
                code = f.f_code
                return run(func, args, kwargs, _sites.get(code) or _site(code), f.f_lineno, False)

            def with_outcome(*args: Any, **kwargs: Any) -> Tuple[Any, Outcome]:
                f = _getframe(1)
                code = f.f_code
                return run(func, args, kwargs, _sites.get(code) or _site(code), f.f_lineno, True)

            wrapper.with_outcome = with_outcome  # type: ignore[attr-defined]
            wrapper.tune_label = label  # type: ignore[attr-defined]
            return wrapper

        return decorate

    def reward(self, call_id: int, reward: float) -> None:
        """Reports the reward of a call by id (once; finite), also after a restart."""
        self._core.reward(call_id, reward)

    def cost(self, call_id: int, usd: float) -> None:
        """Reports the cost of a call in dollars by id (once; finite, not negative)."""
        self._core.cost(call_id, usd)

    def flush(self) -> None:
        """Writes buffered records now and reads back what other processes wrote."""
        self._core.flush()

    def report(self, label: Optional[str] = None) -> Dict[str, Any]:
        """Per label and context, each choice's statistics and the winner (flushes first).

        ``{"groups": [{"label", "context", "winner", "choices": [{"choice", "calls",
        "errors", "success_rate", "rewards", "mean_reward", "ci95", "total_cost_usd",
        "mean_cost_usd", "resets"}, ...]}, ...]}``; all labels for ``None``.
        """
        return self._core.report(label)

    def report_table(self, label: Optional[str] = None) -> str:
        """The report as a text table."""
        return self._core.report_table(label)

    def calls(self, label: Optional[str] = None) -> List[Dict[str, Any]]:
        """Every recorded call (id, label, context, choice, policy, probability, caller,
        started_at, latency_s, error, reward, cost), oldest first; flushes first."""
        return self._core.calls(label)


_default: Optional[Tuner] = None


def default_tuner() -> Tuner:
    """The process-wide tuner behind ``hyperfunc.tune``: the store named by the environment
    variable ``HYPERFUNC_TUNE_STORE``, or ``":memory:"``; created on first use."""
    global _default
    if _default is None:
        import os

        _default = Tuner(os.environ.get("HYPERFUNC_TUNE_STORE", ":memory:"))
    return _default


def tune(
    label: str,
    *,
    choices: Optional[Sequence[str]] = None,
    context: str = "",
    policy: Any = None,
    objective: Any = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@hyperfunc.tune("label", choices=[...])``: ``Tuner.tune`` of ``default_tuner()``."""
    return default_tuner().tune(
        label, choices=choices, context=context, policy=policy, objective=objective
    )
