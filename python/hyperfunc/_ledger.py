"""The cost ledger: what every paid call cost, who made it, and what LLM calls sent.

>>> import hyperfunc as hf
>>> ledger = hf.Ledger(":memory:")
>>> unlocker = ledger.meter("unlocker", per_call=0.0015)
>>> [unlocker.charge(label="fetch", user="acme") for _ in range(3)]
[1500, 1500, 1500]
>>> report = ledger.cost_report(by=["endpoint", "user"])
>>> report["rows"][0]["key"], report["rows"][0]["calls"], report["total_micros"]
(['unlocker', 'acme'], 3, 4500)
"""

import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ._hyperfunc import LedgerCore, MeterCore
from ._tune import _site, _sites

__all__ = ["Ledger", "Meter"]

_getframe = sys._getframe

Since = Union[None, str, int]
"""``None`` (everything), a span back from now (``"30d"``, ``"12h"``, ``"90m"``, ``"2w"``), a
UTC date or time (``"2026-11-01"``, ``"2026-11-01T12:00"``) or Unix seconds (an ``int``)."""

Prices = Union[str, "os.PathLike[str]", Sequence[Dict[str, Any]]]
"""A price table: JSON text, a list of ``{"model", "from": "YYYY-MM-DD", "input", "output",
"cache_read"?, "cache_write"?}`` dicts (dollars per million tokens), or a JSON file's path."""


class Meter:
    """One paid endpoint that is not an LLM (a scraping API, speech to text, a search API).

    Made by ``Ledger.meter``; ``charge()`` records one call's cost against its Python call site
    (``file:function:line``), label, run and user.
    """

    __slots__ = ("_core",)

    def __init__(self, core: MeterCore) -> None:
        self._core = core

    @property
    def endpoint(self) -> str:
        """The endpoint's name (the ``endpoint`` dimension of reports)."""
        return self._core.endpoint

    def charge(
        self,
        label: Optional[str] = None,
        *,
        user: Optional[str] = None,
        run: Optional[str] = None,
        model: Optional[str] = None,
        units: Optional[float] = None,
        usd: Optional[float] = None,
        call_site: Optional[str] = None,
    ) -> int:
        """Records one call and returns the micro-dollars charged (an exact integer).

        ``label`` is the tune label or operation, ``run`` the optimisation run, ``user`` a
        user or customer tag, ``model`` a product within the endpoint. ``units`` is the
        quantity used (pages, minutes…; default 1; required to be finite and not negative);
        ``usd`` is the price the response reported, for a ``from_response`` meter only. The
        caller recorded is where ``charge`` is called (``file:function:line``), or
        ``call_site`` when given (for wrappers that charge on behalf of their caller).

        Raises ``ConfigError`` (with the Rust message) for negative or non-finite units, a
        missing, negative or non-finite ``usd`` on a ``from_response`` meter, or ``usd`` on a
        fixed-price meter. The record is queued; ``Ledger.flush()`` and every report write it.
        """
        f = _getframe(1)
        code = f.f_code
        return self._core.charge(
            _sites.get(code) or _site(code), f.f_lineno, label, run, user, model, units, usd,
            call_site,
        )

    def __repr__(self) -> str:
        return f"Meter({self._core.endpoint!r})"


class Ledger:
    """A cost ledger: one SQLite file (WAL; several processes may share it) or ``":memory:"``.

    It holds one row per paid call (time, caller, endpoint, model, label, run, user, units,
    integer micro-dollars), daily rollups kept on write for fast reports, and one row per LLM
    call of an ``LlmClient`` attached with ``client.attach_ledger(ledger)`` (prompt, answer,
    token classes, latency, cost, quality). Rows are written in batches by a background
    thread; ``flush()`` waits for them and every report flushes first (with the GIL released).

    A file that is not a SQLite database raises ``ConfigError`` (a ``HyperfuncError``) and is
    left untouched. Every bad input raises ``ConfigError`` with the Rust message.
    """

    __slots__ = ("_core",)

    def __init__(self, path: Union[str, "os.PathLike[str]"] = ":memory:") -> None:
        self._core = LedgerCore(os.fspath(path))

    @property
    def path(self) -> str:
        """The ledger file (``":memory:"`` for an in-memory one)."""
        return self._core.path

    def meter(
        self,
        endpoint: str,
        *,
        per_call: Optional[float] = None,
        per_unit: Optional[Tuple[str, float]] = None,
        from_response: bool = False,
    ) -> Meter:
        """A ``Meter`` for the paid endpoint ``endpoint``, priced by exactly one of
        ``per_call`` (dollars per call), ``per_unit=(unit, dollars per unit)`` or
        ``from_response=True`` (each ``charge`` passes ``usd=`` from the response).

        A negative, non-finite or huge price, or not exactly one pricing, raises
        ``ConfigError``.
        """
        return Meter(
            self._core.meter(
                endpoint, per_call=per_call, per_unit=per_unit, from_response=from_response
            )
        )

    def flush(self) -> None:
        """Waits until everything recorded so far is written (the GIL is released)."""
        self._core.flush()

    def set_prices(self, prices: Prices) -> None:
        """Prices LLM calls recorded from now on with this table (JSON text, a list of entry
        dicts or a file path); a model it does not price is costed with the client's own price.
        A bad table raises ``ConfigError``."""
        self._core.set_prices(prices)

    def prices(self) -> List[Dict[str, Any]]:
        """The current LLM price table as a list of entry dicts."""
        return self._core.prices()

    def cost_report(
        self,
        by: Union[str, Sequence[str]] = ("caller",),
        since: Since = None,
        *,
        per_call: bool = False,
    ) -> Dict[str, Any]:
        """Spend per group of the dimensions ``by`` (``caller``, ``endpoint``, ``model``,
        ``label``, ``run``, ``user``, ``day``; a list or one comma-separated string; empty for
        one total row), biggest first, for calls from ``since`` on.

        Returns ``{"by": [...], "since": unix_seconds | None, "rows": [{"key": [...],
        "calls", "units", "micros"}, ...], "total_calls", "total_micros"}``; money is integer
        micro-dollars, days are ``YYYY-MM-DD``. It reads the daily rollups, so ``since`` is
        rounded down to its UTC day; ``per_call=True`` reads the per-call rows instead (exact
        to the second, slower on large ledgers). An unknown dimension or a bad ``since`` raises
        ``ConfigError``.
        """
        return self._core.cost_report(_by(by), since, per_call)

    def cost_table(
        self,
        by: Union[str, Sequence[str]] = ("caller",),
        since: Since = None,
        *,
        per_call: bool = False,
    ) -> str:
        """``cost_report`` as a Markdown table (groups, calls, dollars, share, and the total)."""
        return self._core.cost_table(_by(by), since, per_call)

    def reprice(self, prices: Prices, since: Since = None) -> Tuple[int, int, int]:
        """Re-prices the stored LLM calls from ``since`` on with ``prices`` (JSON text, a list
        of entry dicts or a file path; calls of models it does not price keep their cost) and
        rebuilds the affected rollups, in one transaction.

        Returns ``(calls re-priced, micro-dollars before, micro-dollars after)``.
        """
        return self._core.reprice(prices, since)

    def llm_calls(self, since: Since = None) -> List[Dict[str, Any]]:
        """The stored LLM calls from ``since`` on, oldest first, as dicts (``id``, ``ts``,
        ``who``, ``endpoint``, ``model``, ``system``, ``prompt``, ``prompt_hash``,
        ``response``, ``usage``, ``micros``, ``latency_ms``, ``source``, ``ok``, ``error``,
        ``quality``); ``id`` is what ``quality()`` takes."""
        return self._core.llm_calls(since)

    def llm_report(
        self,
        since: Since = None,
        min_cacheable_tokens: int = 1024,
        cache_lifetime_s: float = 300.0,
        *,
        top: int = 10,
    ) -> Dict[str, Any]:
        """What the stored LLM calls say, as a dict: ``calls`` and ``micros``; the ``costly``
        and ``slowest`` operations (caller × label × model); frequent ``fragments``;
        ``cache_candidates`` (prefixes of at least ``min_cacheable_tokens`` tokens resent
        within ``cache_lifetime_s`` seconds) and ``cache_breakers``; ``unused_fragments``,
        ``unexpected_fragments``, ``observations`` and ``quiet_labels``. ``top`` rows per
        section."""
        return self._core.llm_report(since, min_cacheable_tokens, cache_lifetime_s, top)

    def llm_report_markdown(
        self,
        since: Since = None,
        min_cacheable_tokens: int = 1024,
        cache_lifetime_s: float = 300.0,
        *,
        top: int = 10,
    ) -> str:
        """``llm_report`` as Markdown sections."""
        return self._core.llm_report_markdown(since, min_cacheable_tokens, cache_lifetime_s, top)

    def compare(self, before: str, after: str, label: Optional[str] = None) -> Dict[str, Any]:
        """Compares the LLM calls of two windows, each ``"run:ID"``, ``"FROM..TO"`` (dates or
        times; an empty end means now) or a span back from now (``"24h"``), optionally of one
        ``label``: ``{"before", "after", "label", "before_calls", "after_calls",
        "before_usd", "after_usd", "deltas": [{"metric", "n_before", "n_after", "before",
        "after", "delta", "ci_low", "ci_high", "relative"}, ...]}`` for the per-call metrics
        ``prompt_tokens``, ``output_tokens``, ``usd``, ``latency_ms``, ``quality`` and
        ``error_rate`` (95% intervals; means of empty windows are ``None``). A bad window
        raises ``ConfigError``."""
        return self._core.compare(before, after, label)

    def compare_table(self, before: str, after: str, label: Optional[str] = None) -> str:
        """``compare`` as a Markdown table."""
        return self._core.compare_table(before, after, label)

    def quality(self, call_id: int, q: float) -> None:
        """Records the quality ``q`` (finite, typically in [0, 1]) of the stored LLM call
        ``call_id`` (from ``llm_calls()``), for ``compare``. A non-finite ``q`` or an unknown
        call raises ``ConfigError``."""
        self._core.quality(call_id, q)

    def attach(self, hub: Any) -> None:
        """Sends every ``observe`` record of ``hub`` (a ``hyperfunc.Hub``) to this ledger from
        now on, so ``llm_report`` joins them with the LLM calls by caller and model."""
        self._core.attach(hub)

    def __repr__(self) -> str:
        return f"Ledger({self._core.path!r})"


def _by(by: Union[str, Sequence[str]]) -> Union[str, List[str]]:
    return by if isinstance(by, str) else list(by)
