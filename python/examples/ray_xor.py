"""XOR on two Ray actors: workers get seeds and pair ranges, and send back fitness scalars."""
import numpy as np
import ray
import hyperfunc as hf
from hyperfunc.ray import optimize_distributed


def xor_net():  # each worker builds the system once from this factory
    return hf.Chain([hf.Linear("hidden", 2, 4, "tanh", noise_rank=2),
                     hf.Linear("output", 4, 1, "sigmoid")])


x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
y = np.array([[0], [1], [1], [0]], dtype=np.float32)
data = hf.Examples(x, y)
ray.init(num_cpus=2, include_dashboard=False)
out = optimize_distributed(xor_net, data, "bce", workers=2, minimize=True, lr=0.1,
                           generations=300, seed=42)
print("accuracy", hf.evaluate(xor_net(), out.theta, data, "accuracy"),
      "bytes/generation", out.bytes_per_generation)
