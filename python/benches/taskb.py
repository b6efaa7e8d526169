"""Task B of `hyperfunc bench` in numpy: MLP 64→32→10 (tanh), 256 rows, seed 7.

The data come from the generator the issue defines (SplitMix64, Box–Muller in f64, rounded to
f32), so Python runs see the very numbers `hyperfunc bench` uses.
"""

import json
import math

import numpy as np

import hyperfunc as hf

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


class Normals:
    """Standard normals from SplitMix64 seeded with `seed`, in the issue's order."""

    def __init__(self, seed: int):
        self.state = np.uint64(seed)

    def _u64(self, n: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            k = np.arange(1, n + 1, dtype=np.uint64)
            z = self.state + k * GOLDEN
            self.state = z[-1]
            z = (z ^ (z >> np.uint64(30))) * M1
            z = (z ^ (z >> np.uint64(27))) * M2
            return z ^ (z >> np.uint64(31))

    def normals(self, shape) -> np.ndarray:
        m = int(np.prod(shape))
        o = self._u64(2 * ((m + 1) // 2))
        u1 = ((o[0::2] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
        u2 = (o[1::2] >> np.uint64(11)).astype(np.float64) * 2.0**-53
        r, t = np.sqrt(-2.0 * np.log(u1)), 2.0 * math.pi * u2
        out = np.empty(o.size, dtype=np.float64)
        out[0::2], out[1::2] = r * np.cos(t), r * np.sin(t)
        return out[:m].astype(np.float32).reshape(shape)


def check_generator() -> None:
    got = Normals(42).normals((4,))
    want = np.array([0.41471976, 0.65268123, -0.89188623, 1.32683361], dtype=np.float32)
    assert np.allclose(got, want, atol=1e-7), got


def system():
    """The Task B network (a picklable factory)."""
    return hf.Chain([hf.Mlp("mlp", [64, 32, 10], "tanh")])


def data():
    """(examples, θ0) of Task B."""
    g = Normals(7)
    w1 = g.normals((32, 64)) * np.float32(1 / 8)
    w2 = g.normals((10, 32)) * np.float32(1 / math.sqrt(32))
    x = g.normals((256, 64))
    y = (np.arange(256) % 10).astype(np.float32).reshape(-1, 1)
    theta0 = hf.Theta.from_numpy({
        "mlp.0.weight": w1, "mlp.0.bias": np.zeros(32, np.float32),
        "mlp.1.weight": w2, "mlp.1.bias": np.zeros(10, np.float32),
    })
    return hf.Examples(x, y), theta0


def emit(doc, out=None) -> None:
    """Prints the bench's JSON document, and writes it to `out` when given."""
    text = json.dumps(doc, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
