"""XOR in Python: a 2-4-1 network of Rust layers, trained by evolution strategies."""
import numpy as np
import hyperfunc as hf


class Xor(hf.HyperSystem):
    def __init__(self):
        self.hidden = hf.Linear("hidden", 2, 4, "tanh", noise_rank=2)
        self.output = hf.Linear("output", 4, 1, "sigmoid")

    def run(self, cx, x):
        return cx.call(self.output, cx.call(self.hidden, x))


x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
y = np.array([[0], [1], [1], [0]], dtype=np.float32)
data, xor = hf.Examples(x, y), Xor()
report = hf.optimize(xor, data, "bce", minimize=True, lr=0.1, generations=300, seed=42)
print("accuracy", hf.evaluate(xor, report.theta, data, "accuracy"),
      "bce", round(hf.evaluate(xor, report.theta, data, "bce"), 6))
