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
) -> Report: ...
def set_threads(n: int) -> None: ...

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
    ) -> str: ...
    def stats(self) -> Dict[str, Any]: ...

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
