"""The train step with the block's fused attention against MultiHeadAttention's own call.

    python benchmarks/attention_paths.py [--preset mlp1d] [--calls 20] [--rounds 8] [--set K=V]

`TransformerBlock.attention` computes `keras.layers.MultiHeadAttention`'s mathematics on
its weights with one matmul for the query, key and value projections (gpicl_tf/layers.py).
This times one train step both ways, each on a warm trainer of its own from the same
seeded start, in interleaved rounds (the order alternates from round to round, so neither
path always runs second) on one cached batch (the step alone), and prints the medians,
their ratio, and each path's loss after the same number of steps: the reference is the
old path, measured in the same run. Add --set train.jit_compile=false for the step
without XLA.
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import matmul_peak_gflops  # noqa: E402
from benchmarks.train_throughput import (alternating_rounds, one_batch_dataset_fn,  # noqa: E402
                                         warm_trainer)
from gpicl_tf import layers  # noqa: E402
from gpicl_tf.config import apply_overrides, get_preset  # noqa: E402


def multi_head_attention_call(self, h, mask):
    """The attention sublayer as MultiHeadAttention's call computes it (the old path)."""
    a = self.ln_attn(h)
    return self.attn(a, a, attention_mask=mask)


def trainer_with(attention, cfg):
    """A warm trainer whose train step was traced with `attention` as the blocks' method
    (the step is a traced tf.function: the method in place at tracing time is the one
    it runs)."""
    fused = layers.TransformerBlock.attention
    layers.TransformerBlock.attention = attention
    try:
        return warm_trainer(cfg, dataset_fn=one_batch_dataset_fn(cfg))
    finally:
        layers.TransformerBlock.attention = fused


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mlp1d")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)
    cfg = apply_overrides(get_preset(a.preset), a.set)
    peak = matmul_peak_gflops()
    trainers = {"fused": trainer_with(layers.TransformerBlock.attention, cfg),
                "MultiHeadAttention": trainer_with(multi_head_attention_call, cfg)}
    print(f"preset={a.preset} jit={cfg.train.jit_compile} batch={cfg.train.batch_size} "
          f"points={cfg.task.n_points} d_model={cfg.model.d_model} layers={cfg.model.n_layers}"
          f" heads={cfg.model.n_heads}; fp32 matmul peak {peak:.1f} GFLOP/s")
    rates = {name: [] for name in trainers}
    losses = {}
    for r, name, rate, losses[name], cores in alternating_rounds(trainers, a.rounds, a.calls):
        rates[name].append(rate)
        print(f"round {r + 1}: {name} {rate:.2f} steps/s ({cores:.2f} cores)", flush=True)
    steps = (a.rounds * a.calls + 2) * cfg.train.steps_per_call
    med = {name: statistics.median(v) for name, v in rates.items()}
    for name in trainers:
        print(f"{name:>18}: median {med[name]:.2f} steps/s, best {max(rates[name]):.2f}; "
              f"loss of the last call after {steps} steps {losses[name]:.5f}")
    print(f"fused / MultiHeadAttention = {med['fused'] / med['MultiHeadAttention']:.3f}x "
          f"(medians over {a.rounds} rounds)")


if __name__ == "__main__":
    main()
