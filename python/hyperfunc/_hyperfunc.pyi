"""Type stubs of the native module (built from python/src/lib.rs)."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

class HyperfuncError(Exception): ...
class ConfigError(HyperfuncError): ...
class CallError(HyperfuncError): ...

class ParamSpec:
    def __init__(
        self,
        shape: Sequence[int],
        *,
        init: Union[None, str, float, Sequence[Any]] = None,
        noise_rank: Optional[int] = None,
        bounds: Optional[Tuple[float, float]] = None,
    ) -> None: ...
    @staticmethod
    def matrix(out: int, inp: int) -> "ParamSpec": ...
    @staticmethod
    def vector(n: int) -> "ParamSpec": ...
    @staticmethod
    def scalar() -> "ParamSpec": ...
    @property
    def shape(self) -> List[int]: ...

class LmParams:
    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    max_tokens_frac: float
    def __init__(self) -> None: ...
    @staticmethod
    def spec() -> ParamSpec: ...
    @staticmethod
    def from_values(values: Sequence[float]) -> "LmParams": ...

class HyperFn:
    @property
    def name(self) -> str: ...
    @property
    def param_names(self) -> List[str]: ...
    @property
    def prompt(self) -> Optional[str]: ...
    def with_prompt(self, text: str) -> "HyperFn": ...

def Linear(
    name: str,
    inp: int,
    out: int,
    activation: str = "identity",
    *,
    bias: bool = True,
    noise_rank: Optional[int] = None,
) -> HyperFn: ...
def Mlp(
    name: str,
    sizes: Sequence[int],
    hidden: str = "tanh",
    output: str = "identity",
    *,
    noise_rank: Optional[int] = None,
) -> HyperFn: ...
def function(
    name: str,
    fn_: Callable[..., Any],
    param: Optional[ParamSpec] = None,
    *,
    retries: int = 0,
    timeout: Optional[float] = None,
    concurrency: int = 64,
) -> HyperFn: ...
def tensor(
    name: str,
    spec: ParamSpec,
    fn_: Callable[[npt.NDArray[np.float32], npt.NDArray[np.float32]], npt.ArrayLike],
) -> HyperFn: ...

class Value:
    @property
    def batched(self) -> bool: ...
    def numpy(self) -> npt.NDArray[np.float32]: ...
    def items(self) -> List[Any]: ...

class Cx:
    def call(self, f: HyperFn, x: Value) -> Value: ...
    def combine(self, values: Sequence[Value]) -> Value: ...
    def split(self, value: Value, sizes: Sequence[int]) -> List[Value]: ...
    @property
    def population(self) -> int: ...

class Chain:
    def __init__(self, stages: Sequence[HyperFn]) -> None: ...
    def hyperfunctions(self) -> List[HyperFn]: ...
    def __len__(self) -> int: ...

class Examples:
    def __init__(self, x: npt.ArrayLike, y: npt.ArrayLike) -> None: ...
    @staticmethod
    def json(inputs: Sequence[Any], targets: Sequence[Any]) -> "Examples": ...
    def split(self, fraction: float, seed: int) -> Tuple["Examples", "Examples"]: ...
    def __len__(self) -> int: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> "Examples": ...

class Theta:
    @staticmethod
    def init(system: Any, seed: int = 0) -> "Theta": ...
    @staticmethod
    def from_numpy(
        arrays: Dict[str, npt.ArrayLike], prompts: Optional[Dict[str, str]] = None
    ) -> "Theta": ...
    def to_numpy(self) -> Dict[str, npt.NDArray[np.float32]]: ...
    def __getitem__(self, name: str) -> npt.NDArray[np.float32]: ...
    def names(self) -> List[str]: ...
    def prompts(self) -> Dict[str, str]: ...
    @property
    def num_params(self) -> int: ...
    def save(self, path: str) -> None: ...
    @staticmethod
    def load(path: str) -> "Theta": ...
    def bit_eq(self, other: "Theta") -> bool: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes) -> "Theta": ...

Metric = Union[str, "Scorer", Callable[[Any, Any], float]]

class Report:
    @property
    def theta(self) -> Theta: ...
    @property
    def final_fitness(self) -> float: ...
    @property
    def best_fitness(self) -> Optional[float]: ...
    @property
    def best_generation(self) -> Optional[int]: ...
    @property
    def best_theta(self) -> Optional[Theta]: ...
    @property
    def stop(self) -> str: ...
    @property
    def seconds(self) -> float: ...
    @property
    def run(self) -> Optional[int]: ...
    @property
    def history(self) -> List[Dict[str, float]]: ...
    def to_pandas(self) -> Any: ...

def evaluate(system: Any, theta: Theta, examples: Examples, metric: Metric) -> float: ...
def evaluate_population(
    system: Any,
    thetas: Sequence[Theta],
    examples: Examples,
    metric: Metric,
    max_batch_size: int = 262144,
) -> List[float]: ...
def optimize(
    system: Any,
    examples: Examples,
    metric: Metric,
    *,
    pop_size: int = 64,
    sigma: float = 0.1,
    lr: float = 0.05,
    generations: int = 100,
    seed: int = 0,
    minimize: bool = False,
    antithetic: bool = True,
    patience: Optional[int] = None,
    target: Optional[float] = None,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    momentum: float = 0.9,
    max_batch_size: int = 262144,
    max_failure_rate: float = 1.0,
    progress: bool = True,
    init: Optional[Theta] = None,
    hub: Optional["Hub"] = None,
    store: Optional[str] = None,
    run: Optional[int] = None,
    run_name: Optional[str] = None,
    checkpoint_every: Optional[int] = None,
    examples_per_eval: Optional[int] = None,
    llm_clients: Optional[Sequence["LlmClient"]] = None,
    max_cost_usd: Optional[float] = None,
    max_tokens: Optional[int] = None,
    autotune: bool = True,
) -> Report: ...
def set_threads(n: int) -> None: ...

class EsWorker:
    """One worker of a distributed ES run (see ``hyperfunc.ray``)."""
    def __init__(
        self,
        system: Any,
        examples: Examples,
        metric: Metric,
        *,
        pop_size: int = 64,
        sigma: float = 0.1,
        lr: float = 0.05,
        generations: int = 100,
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
    ) -> None: ...
    @property
    def pairs(self) -> int: ...
    @property
    def candidates_per_pair(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def theta(self) -> Theta: ...
    def evaluate(self, generation: int, start: int, end: int) -> bytes: ...
    def tell(self, fitness: bytes) -> None: ...
    def replay(self, log: Sequence[bytes]) -> None: ...
    def theta_hash(self) -> int: ...
    def checkpoint(self) -> bytes: ...
    def restore(self, data: bytes) -> None: ...
    def evaluate_theta(self) -> float: ...

class RunStore:
    """A run store directory: runs, generation rows, events, commands, checkpoints."""
    def __init__(self, path: str) -> None: ...
    @property
    def path(self) -> str: ...
    def list(self) -> List[Dict[str, Any]]: ...
    def info(self, run: int) -> Dict[str, Any]: ...
    def generations(self, run: int) -> List[Dict[str, Any]]: ...
    def events(self, run: int) -> List[Dict[str, Any]]: ...
    def commands(self, run: int) -> List[Dict[str, Any]]: ...
    def effective_config(self, run: int, gen: Optional[int] = None) -> Dict[str, Any]: ...
    def theta(self, run: int) -> Theta: ...
    def put_dataset(self, name: str, items: Union[str, List[Dict[str, Any]]]) -> Dict[str, Any]: ...
    def record_eval(
        self,
        run: int,
        name: str,
        scores: Dict[str, float],
        *,
        metric: str,
        split: str = "all",
        version: Optional[int] = None,
    ) -> float: ...
    def compare(self, baseline: int, candidate: int, metric: str) -> Dict[str, Any]: ...
    def control(self, run: int, source: str = "python") -> "Control": ...

class Control:
    """Writes checked commands to one run; applied at the next generation boundary."""
    def set(self, at_gen: Optional[int] = None, **values: Any) -> int: ...
    def clear(self, *names: str, at_gen: Optional[int] = None) -> int: ...
    def pause(self) -> int: ...
    def resume(self) -> int: ...
    def stop(self, now: bool = False, at_gen: Optional[int] = None) -> int: ...
    def snapshot(self) -> int: ...

class LlmClient:
    def __init__(
        self,
        base_url: str,
        api_key: Optional[str] = None,
        *,
        requests_per_minute: Optional[int] = None,
        tokens_per_minute: Optional[int] = None,
        max_requests: Optional[int] = None,
        max_cost_usd: Optional[float] = None,
        cache_path: Optional[str] = None,
        cache: bool = True,
    ) -> None: ...
    @staticmethod
    def from_env() -> "LlmClient": ...
    def chat(
        self,
        model: str,
        prompt: str,
        *,
        system: Optional[str] = None,
        temperature: Optional[float] = None,
        label: Optional[str] = None,
        run: Optional[str] = None,
        user: Optional[str] = None,
    ) -> str:
        """One chat completion; returns the text. With a ledger attached the call is recorded
        against the Python caller (``file:function:line``), ``label``, ``run`` and ``user``."""
    def stats(self) -> Dict[str, Any]: ...
    def attach_ledger(self, ledger: Any) -> None:
        """Records every call from now on in ``ledger`` (a ``hyperfunc.Ledger``): prompt,
        answer, token classes, latency, micro-dollars and caller. A non-ledger raises
        ``TypeError``."""
        ...

def llm(
    name: str,
    client: LlmClient,
    model: str,
    prompt: Optional[str] = None,
    *,
    learn: bool = True,
    json: bool = False,
) -> HyperFn: ...

Field = Union[str, Tuple[str, str], Tuple[str, str, str]]

class Signature:
    def __init__(self, instruction: str, inputs: Sequence[Field], outputs: Sequence[Field]) -> None: ...
    @property
    def instruction(self) -> str: ...
    def render_system(self, instruction: str) -> str: ...
    def render_user(self, input: Any) -> str: ...

def predict(
    name: str,
    client: LlmClient,
    model: str,
    signature: Signature,
    *,
    learn_prompt: bool = True,
    learn_params: bool = True,
) -> HyperFn: ...

class Scorer:
    @staticmethod
    def exact_match(*, case_sensitive: bool = False, strip: bool = True) -> "Scorer": ...
    @staticmethod
    def numeric_distance(*, tolerance: float = 1e-6, max_distance: float = 1.0) -> "Scorer": ...
    @staticmethod
    def classification(labels: Sequence[str]) -> "Scorer": ...
    @staticmethod
    def contains(*, case_sensitive: bool = False) -> "Scorer": ...
    @staticmethod
    def regex(pattern: str, *, full_match: bool = False) -> "Scorer": ...
    @staticmethod
    def judge(client: LlmClient, model: str, criteria: Optional[str] = None) -> "Scorer": ...
    def score(self, pred: Any, expected: Any, input: Any = None) -> Tuple[float, str]: ...
    @property
    def name(self) -> str: ...

def optimize_prompts(
    system: Any,
    theta: Theta,
    examples: Examples,
    scorer: Scorer,
    client: LlmClient,
    model: str,
    *,
    max_iterations: int = 5,
    validation: Optional[float] = 0.3,
    seed: int = 0,
    hub: Optional["Hub"] = None,
) -> Tuple[Theta, Dict[str, Any]]: ...

class Hub:
    def __init__(self) -> None: ...
    def records(self) -> List[Dict[str, Any]]: ...
    def summary(self) -> Dict[str, Any]: ...
    def summary_markdown(self) -> str: ...
    def write_jsonl(self, path: str) -> None: ...
    def __len__(self) -> int: ...

# ---- tune (the Python half, `Tuner`, is in hyperfunc/_tune.py)

Policy = Union[str, Tuple[str, Union[float, str]]]
Objective = Union[str, Tuple[str, float]]

class Outcome:
    """A finished tuned call: report its reward and cost here."""

    def reward(self, reward: float) -> None: ...
    def cost(self, usd: float) -> None: ...
    @property
    def id(self) -> int: ...
    @property
    def choice(self) -> str: ...
    @property
    def probability(self) -> Optional[float]: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def caller(self) -> Tuple[str, str, int]: ...

class PendingCall:
    @property
    def choice(self) -> str: ...
    def finish(self, error: Optional[str] = None) -> Optional[Outcome]: ...
    def abandon(self) -> None: ...

class TuneSpec:
    @property
    def label(self) -> str: ...
    def run(
        self,
        func: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Optional[Dict[str, Any]],
        site: Tuple[str, str],
        line: int,
        with_outcome: bool,
    ) -> Any: ...
    def start(self, site: Tuple[str, str], line: int) -> PendingCall: ...

class TuneCore:
    def __init__(
        self,
        path: str,
        *,
        seed: Optional[int] = None,
        policy: Optional[Policy] = None,
        objective: Optional[Objective] = None,
    ) -> None: ...
    def spec(
        self,
        label: str,
        choices: Optional[List[str]] = None,
        context: str = "",
        policy: Optional[Policy] = None,
        objective: Optional[Objective] = None,
    ) -> TuneSpec: ...
    def reward(self, call_id: int, reward: float) -> None: ...
    def cost(self, call_id: int, usd: float) -> None: ...
    def flush(self) -> None: ...
    def report(self, label: Optional[str] = None) -> Dict[str, Any]: ...
    def report_table(self, label: Optional[str] = None) -> str: ...
    def calls(self, label: Optional[str] = None) -> List[Dict[str, Any]]: ...

# The cost ledger (python/src/ledger.rs); the public classes are hyperfunc.Ledger and
# hyperfunc.Meter (hyperfunc/_ledger.py).

_Since = Union[None, str, int]

class MeterCore:
    """The native half of ``hyperfunc.Meter``: one paid endpoint and its price."""

    @property
    def endpoint(self) -> str:
        """The endpoint's name."""
        ...
    def charge(
        self,
        site: Tuple[str, str],
        line: int,
        label: Optional[str] = None,
        run: Optional[str] = None,
        user: Optional[str] = None,
        model: Optional[str] = None,
        units: Optional[float] = None,
        usd: Optional[float] = None,
        call_site: Optional[str] = None,
    ) -> int:
        """Records one call made at ``site`` (``(file, function)``) line ``line`` (or at
        ``call_site``); returns the micro-dollars charged. Bad units or ``usd`` raise
        ``ConfigError``."""
        ...

class LedgerCore:
    """The native half of ``hyperfunc.Ledger``: one ledger file (SQLite) or ``":memory:"``.
    A file that is not a SQLite database raises ``ConfigError`` and is left untouched."""

    def __init__(self, path: str) -> None: ...
    @property
    def path(self) -> str:
        """The file."""
        ...
    def meter(
        self,
        endpoint: str,
        *,
        per_call: Optional[float] = None,
        per_unit: Optional[Tuple[str, float]] = None,
        from_response: bool = False,
    ) -> MeterCore:
        """A meter priced by exactly one of ``per_call`` (dollars), ``per_unit``
        (``(unit, dollars)``) or ``from_response=True``; a bad price raises ``ConfigError``."""
        ...
    def flush(self) -> None:
        """Waits until everything recorded so far is written (GIL released)."""
        ...
    def set_prices(self, prices: Any) -> None:
        """Prices LLM calls with this table from now on (JSON text, entry dicts or a path)."""
        ...
    def prices(self) -> List[Dict[str, Any]]:
        """The current LLM price table's entries."""
        ...
    def cost_report(
        self, by: Union[str, List[str]], since: _Since = None, per_call: bool = False
    ) -> Dict[str, Any]:
        """``{"by", "since", "rows": [{"key", "calls", "units", "micros"}], "total_calls",
        "total_micros"}``; an unknown dimension raises ``ConfigError``."""
        ...
    def cost_table(
        self, by: Union[str, List[str]], since: _Since = None, per_call: bool = False
    ) -> str:
        """The cost report as a Markdown table."""
        ...
    def reprice(self, prices: Any, since: _Since = None) -> Tuple[int, int, int]:
        """Re-prices stored LLM calls: ``(calls, micros_before, micros_after)``."""
        ...
    def llm_calls(self, since: _Since = None) -> List[Dict[str, Any]]:
        """Stored LLM calls, oldest first."""
        ...
    def llm_report(
        self,
        since: _Since = None,
        min_cacheable_tokens: int = 1024,
        cache_lifetime_s: float = 300.0,
        top: int = 10,
    ) -> Dict[str, Any]:
        """The LLM report as a dict."""
        ...
    def llm_report_markdown(
        self,
        since: _Since = None,
        min_cacheable_tokens: int = 1024,
        cache_lifetime_s: float = 300.0,
        top: int = 10,
    ) -> str:
        """The LLM report as Markdown."""
        ...
    def compare(self, before: str, after: str, label: Optional[str] = None) -> Dict[str, Any]:
        """Compares two windows (``run:ID``, ``FROM..TO`` or a span) of LLM calls."""
        ...
    def compare_table(self, before: str, after: str, label: Optional[str] = None) -> str:
        """``compare`` as a Markdown table."""
        ...
    def quality(self, call_id: int, quality: float) -> None:
        """Records the quality of a stored LLM call; a non-finite value or an unknown call
        raises ``ConfigError``."""
        ...
    def attach(self, hub: Hub) -> None:
        """Sends every ``observe`` record of ``hub`` to this ledger from now on."""
        ...
