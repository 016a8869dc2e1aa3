"""Where one train step's time goes, by timing its parts in isolation.

    python benchmarks/profile_step.py [--preset default] [--no-xla] [--repeats 20] [--set K=V ...]

Each part runs as its own compiled function on the step's real shapes
(B tasks x N points x d_model), forward and backward, and is reported in ms
and as a share of the whole step measured in the same run: the attention
sublayer (LN + masked multi-head attention, all layers), the MLP sublayer
(LN + GELU MLP, all layers), the model forward alone, forward + backward,
the optimizer update (Adam on every weight), and the task stream (one batch). With
kernel fits (the `default` preset) the forward parts are the model after its
standardisation, timed under XLA, and the standardisation (the context's ridge and
kernel fits) is its own part outside XLA, as the train step runs them. The whole step
runs on one kept stream iterator, as training does.
The parts overlap (forward + backward contains the sublayers), so the shares
do not add up to 100%. For a trace, wrap any part in
tf.profiler.experimental.trace and open it in TensorBoard's profile plugin.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.common import matmul_peak_gflops  # noqa: E402
from gpicl_tf import data as data_lib  # noqa: E402
from gpicl_tf.config import apply_overrides, get_preset  # noqa: E402
from gpicl_tf.layers import ContextAttentionMask  # noqa: E402
from gpicl_tf.model import model_inputs, point_prediction  # noqa: E402
from gpicl_tf.train import (Trainer, fits_outside_xla, run_steps,  # noqa: E402
                            stream_iterator)


def best_ms(fn, repeats: int = 20) -> float:
    """Best of 3 rounds of `repeats` calls, in ms per call (after one warm-up call)."""
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
    best = float("inf")
    for _ in range(3):
        tic = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, out)
        best = min(best, (time.perf_counter() - tic) / repeats)
    return 1e3 * best


def sublayer_fn(blocks, which: str, h, mask, jit: bool):
    """Forward + backward of the attention or MLP sublayer of every block."""
    variables = [v for b in blocks for v in (
        b.ln_attn.trainable_variables + b.attn.trainable_variables if which == "attention"
        else b.ln_mlp.trainable_variables + b.mlp_in.trainable_variables
        + b.mlp_out.trainable_variables)]

    @tf.function(jit_compile=jit)
    def run():
        with tf.GradientTape() as tape:
            total = 0.0
            for b in blocks:
                out = b.attention(h, mask) if which == "attention" else b.mlp(h)
                total += tf.reduce_sum(out)
        return tape.gradient(total, variables)

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--no-xla", action="store_true", help="time the parts without XLA")
    p.add_argument("--repeats", type=int, default=20,
                   help="calls per timing round of each part (best of 3 rounds; default 20)")
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error(f"--repeats {a.repeats}: expected a whole number >= 1")
    jit = not a.no_xla
    best = lambda fn: best_ms(fn, a.repeats)  # noqa: E731
    cfg = apply_overrides(get_preset(a.preset), a.set + [f"train.jit_compile={str(jit).lower()}"])
    trainer = Trainer(cfg, tempfile.mkdtemp(), strategy=tf.distribute.get_strategy())
    model, opt = trainer.model, trainer.optimizer
    ds = data_lib.make_dataset(cfg.task, cfg.train.seed, cfg.train.batch_size)
    it = iter(ds)
    batch = model_inputs(next(it))
    k = cfg.train.steps_per_call

    # One stream iterator for every call, as training keeps one per run (a new iterator
    # per call timed the stream's start too, and put the step in a slow mode at times:
    # benchmarks/train_throughput.py's warm_trainer)
    train_it = stream_iterator(trainer)
    run_steps(trainer, 2, k, train_it)  # compile and warm up
    step_ms = float("inf")
    calls = max(1, a.repeats // 4)  # 5 calls of steps_per_call steps by default
    for _ in range(3):  # best of 3 rounds, like every part below
        tic = time.perf_counter()
        run_steps(trainer, calls, k, train_it)
        step_ms = min(step_ms, 1e3 * (time.perf_counter() - tic) / (calls * k))

    # As the train step does: with kernel fits, the standardisation outside XLA and the
    # model after it (model.trunk()) inside
    split = fits_outside_xla(model, jit)
    if split:
        std_layer = model.get_layer("standardize")

        @tf.function
        def standardize():
            return std_layer(batch["x"], batch["y"], batch["is_query"])

        trunk, (feats, y_loc, y_scale) = model.trunk(), standardize()

        def call():
            return trunk([feats, y_loc, y_scale, batch["is_query"]], training=True)
    else:
        def call():
            return model(batch, training=True)

    @tf.function(jit_compile=jit)
    def forward():
        return call()

    @tf.function(jit_compile=jit)
    def forward_backward():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(point_prediction(call())))
        return tape.gradient(loss, model.trainable_variables)

    grads = [tf.zeros_like(v) for v in model.trainable_variables]

    @tf.function(jit_compile=jit)
    def update():
        opt.apply(grads, model.trainable_variables)
        return opt.iterations

    blocks = [layer for layer in model.layers if layer.name.startswith("block_")]
    b, n, d = cfg.train.batch_size, cfg.task.n_points, cfg.model.d_model
    h = tf.random.normal([b, n, d])
    mask = ContextAttentionMask()(batch["is_query"])
    parts = [
        ("attention sublayers (fwd+bwd, all layers)",
         best(sublayer_fn(blocks, "attention", h, mask, jit))),
        ("MLP sublayers (fwd+bwd, all layers)", best(sublayer_fn(blocks, "mlp", h, mask, jit))),
        ("model forward" + (" after the fits" if split else ""), best(forward)),
        ("model forward + backward" + (" after the fits" if split else ""),
         best(forward_backward)),
    ] + ([("context fits (standardisation, outside XLA)", best(standardize))]
         if split else []) + [
        ("optimizer update (Adam)", best(update)),
        ("task stream, one batch", best(lambda: next(it))),
    ]
    peak = matmul_peak_gflops()
    print(f"preset={a.preset} xla={jit} batch={b} points={n} d_model={d} "
          f"layers={cfg.model.n_layers} heads={cfg.model.n_heads}; fp32 matmul peak "
          f"{peak:.0f} GFLOP/s")
    print(f"{'whole train step':45s} {step_ms:8.2f} ms  100%")
    for name, ms in parts:
        print(f"{name:45s} {ms:8.2f} ms  {ms / step_ms:4.0%}")
    keras.backend.clear_session()


if __name__ == "__main__":
    main()
