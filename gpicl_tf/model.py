"""The in-context transformer as a Keras functional model.

Inputs (named): x [B, N, dx], y [B, N, dy], is_query [B, N] (1 = query).
Output: y_pred [B, N, dy] on the raw scale of y (classification: class logits);
only query rows are meaningful. With head="bar" the output is a dict: y_pred
(the predictive mean, raw scale), logits [B, N, dy, n_bins] of the bar
distribution over the standardised y, and y_loc [B, 1, dy] ([B, N, dy] with
model.base_fit), y_scale [B, 1, dy] that map standardised values to the raw scale
(`Predictive` turns them into quantiles, standard deviations and densities).

Each point is one token built from (standardised x, standardised y zeroed on
queries, query flag). No positional encoding: a task is a set of points.
Every point attends only to context points (and itself), so each query is
predicted independently of the other queries.
"""

from __future__ import annotations

import math
from typing import Optional

import keras
import tensorflow as tf

from gpicl_tf.config import ExperimentConfig
from gpicl_tf.distributions import BarDistribution
from gpicl_tf.layers import (PACKAGE, BarHead, ContextAttentionMask, ContextStandardizer,
                             Destandardize, TransformerBlock, bar_outputs, unit_scale)


@keras.saving.register_keras_serializable(package=PACKAGE)
class InContextTransformer(keras.Model):
    """The in-context learner: a set transformer over (x, y, query flag) tokens.

    A `keras.Model` built functionally in `__init__` (the keras-hub backbone
    pattern): its hyperparameters are its config, so it saves, loads and
    clones without the experiment config.

    Args:
      x_dim, y_dim: input and output widths.
      d_model: token width.
      n_layers: pre-LayerNorm transformer blocks.
      n_heads: attention heads.
      key_dim: per-head query/key size (default d_model // n_heads).
      mlp_ratio: each block's MLP width as a multiple of d_model.
      gelu: the MLP's activation: "exact" GELU or its "tanh" approximation.
      std_eps: relative spread floor of the per-task standardisation.
      absent_features: what the model is told of absent (zero-padded) input
        features: "zero", "flags", "rescale" or "both" (see ContextStandardizer).
      classify: y is one-hot and the output are class logits (no y
        standardisation, no output map).
      head: "mse" (the output is the prediction) or "bar" (the output is a dict
        with the bar distribution's logits; see the module docstring).
      n_bins: bins of the bar head.
      bar_tail, bar_tail_index: the bar head's tails beyond its outer borders, "normal"
        (half-normal) or "pareto" of that index (BarHead, gpicl_tf.distributions).
      ridge_penalties: penalties of the context ridge fits each token carries
        (regression; see ContextStandardizer); () for none.
      kernel_length_scales, kernel_noise: the context's RBF-kernel GP fits each
        token carries (regression; see ContextStandardizer); () for none.
      fit_loo: context tokens carry the fits' leave-one-out predictions
        (ContextStandardizer).
      cubic_penalties: penalties of the context's ridge fits on each feature, its square
        and its cube (ContextStandardizer); () for none.
      kernel_std: tokens also carry the log predictive std of each kernel fit
        (ContextStandardizer).
      base_fit: "loo_best" centres every prediction on the fit with the least
        leave-one-out error (ContextStandardizer); y_loc is then [B, N, dy].
        "loo_evidence": of the kernel fits only the likeliest competes; "loo_bma": their
        evidence-weighted average competes instead.
      recalibrate: the bar head holds a recalibration map per context size (BarHead),
        fitted after training (`gpicl_tf.train.fit_recalibration`).
      recalibrate_width: with recalibrate, a map per context size and input-width group
        (BarHead's by_width).
      loo_intercept: the ridge fits' leave-one-out residuals count the intercept the
        standardisation fitted (ContextStandardizer).
      y_scale: "student_t" widens y_scale by the Student-t predictive factor of the
        context's size (ContextStandardizer); "loo" makes it the base fit's
        leave-one-out error (needs a base fit); "loo_gp" that error per
        point, times the base GP fit's relative predictive std there (also needs
        kernel_length_scales; y_scale is then [B, N, dy]); "std" leaves it the
        context's std.

    Example:

    >>> import numpy as np
    >>> model = InContextTransformer(x_dim=1, y_dim=1, d_model=32, n_layers=2, n_heads=2)
    >>> x = np.random.uniform(-1, 1, (4, 10, 1)).astype("float32")
    >>> y, q = np.sin(3 * x), np.zeros((4, 10), "float32")
    >>> q[:, 7:] = 1.0                      # the last 3 points are queries
    >>> model({"x": x, "y": y * (1 - q[..., None]), "is_query": q}).shape
    TensorShape([4, 10, 1])
    """

    def __init__(self, x_dim: int, y_dim: int, d_model: int = 64, n_layers: int = 4,
                 n_heads: int = 4, key_dim: Optional[int] = None, mlp_ratio: int = 4,
                 gelu: str = "exact", std_eps: float = 1e-7, classify: bool = False,
                 absent_features: str = "zero", head: str = "mse", n_bins: int = 64,
                 ridge_penalties=(), kernel_length_scales=(), kernel_noise: float = 0.01,
                 fit_loo: bool = False, base_fit: str = "none", y_scale: str = "std",
                 recalibrate: bool = False, kernel_std: bool = False, cubic_penalties=(),
                 bar_tail: str = "normal", bar_tail_index: float = 3.0,
                 recalibrate_width: bool = False, loo_intercept: bool = False, **kwargs):
        head_dim = key_dim if key_dim is not None else d_model // n_heads
        x = keras.Input((None, x_dim), name="x")
        y = keras.Input((None, y_dim), name="y")
        is_query = keras.Input((None,), name="is_query")
        # Statistics and the output map stay in float32 under mixed precision.
        standardize = ContextStandardizer(
            eps=std_eps, standardize_y=not classify, absent_features=absent_features,
            ridge_penalties=ridge_penalties, kernel_length_scales=kernel_length_scales,
            kernel_noise=kernel_noise, fit_loo=fit_loo, base_fit=base_fit, y_scale=y_scale,
            kernel_std=kernel_std, cubic_penalties=cubic_penalties,
            loo_intercept=loo_intercept, dtype="float32",
            name="standardize")
        feats, y_loc, y_scale = standardize(x, y, is_query)
        if head not in ("mse", "bar"):
            raise ValueError(f"head={head!r} is invalid: expected 'mse' or 'bar'")
        if head == "bar" and classify:
            raise ValueError("head='bar' is invalid for classification: expected 'mse'")
        res_scale = 1.0 / math.sqrt(2 * n_layers)
        # Each layer is made when the graph first calls it (initialiser seeds are drawn in
        # that order, so the initial weights stay what they were).
        make = {"attention_mask": lambda: ContextAttentionMask(name="attention_mask"),
                "embed": lambda: keras.layers.Dense(d_model, name="embed"),
                "block": lambda i: TransformerBlock(d_model, n_heads, head_dim,
                                                    mlp_ratio * d_model,
                                                    residual_scale=res_scale, gelu=gelu,
                                                    name=f"block_{i}"),
                "ln_final": lambda: keras.layers.LayerNormalization(epsilon=1e-5,
                                                                    name="ln_final"),
                "bar": lambda: BarHead(y_dim, n_bins, recalibrate=recalibrate,
                                       tail=bar_tail, tail_index=bar_tail_index,
                                       by_width=recalibrate_width, x_dim=x_dim,
                                       dtype="float32", name="bar"),
                "dense": lambda: keras.layers.Dense(y_dim, kernel_initializer="zeros",
                                                    dtype="float32",
                                                    name="y_pred" if classify else "head"),
                "destandardize": lambda: Destandardize(dtype="float32", name="y_pred")}
        outputs = _trunk_outputs(lambda name, *i: make[name](*i), n_layers, head == "bar",
                                 classify, feats, y_loc, y_scale, is_query)
        super().__init__({"x": x, "y": y, "is_query": is_query}, outputs, **kwargs)
        self.x_dim, self.y_dim = x_dim, y_dim
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.key_dim, self.mlp_ratio, self.std_eps = key_dim, mlp_ratio, std_eps
        self.gelu = gelu
        self.classify, self.absent_features = classify, absent_features
        self.head, self.n_bins, self.recalibrate = head, n_bins, bool(recalibrate)
        self.bar_tail, self.bar_tail_index = bar_tail, float(bar_tail_index)
        self.recalibrate_width = bool(recalibrate_width)
        self.ridge_penalties = tuple(float(v) for v in ridge_penalties)
        self.kernel_length_scales = tuple(float(v) for v in kernel_length_scales)
        self.kernel_noise, self.fit_loo = standardize.kernel_noise, standardize.fit_loo
        self.base_fit, self.y_scale = standardize.base_fit, standardize.y_scale
        self.kernel_std = standardize.kernel_std
        self.cubic_penalties = standardize.cubic_penalties
        self.loo_intercept = standardize.loo_intercept

    def trunk(self) -> keras.Model:
        """The model after its standardisation, sharing this model's layers and weights:
        [features, y_loc, y_scale, is_query] (the `standardize` layer's outputs and the
        query flags) -> this model's outputs. The train step uses it to keep the context
        fits' Cholesky solves out of XLA (`gpicl_tf.train`)."""
        names = {"dense": "y_pred" if self.classify else "head", "destandardize": "y_pred"}

        def layer(name, *i):
            return self.get_layer(f"block_{i[0]}" if i else names.get(name, name))

        feats = keras.Input((None, layer("embed").kernel.shape[0]), name="features")
        y_loc = keras.Input((None, self.y_dim), name="y_loc")  # [B, N, dy] with base_fit
        y_scale = keras.Input((None if self.y_scale == "loo_gp" else 1, self.y_dim),
                              name="y_scale")  # [B, N, dy] per point with "loo_gp"
        is_query = keras.Input((None,), name="is_query")
        return keras.Model([feats, y_loc, y_scale, is_query],
                           _trunk_outputs(layer, self.n_layers, self.head == "bar",
                                          self.classify, feats, y_loc, y_scale, is_query))

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "x_dim": self.x_dim, "y_dim": self.y_dim, "d_model": self.d_model,
                "n_layers": self.n_layers, "n_heads": self.n_heads, "key_dim": self.key_dim,
                "mlp_ratio": self.mlp_ratio, "gelu": self.gelu, "std_eps": self.std_eps,
                "classify": self.classify, "absent_features": self.absent_features,
                "head": self.head, "n_bins": self.n_bins,
                "ridge_penalties": list(self.ridge_penalties),
                "kernel_length_scales": list(self.kernel_length_scales),
                "kernel_noise": (list(self.kernel_noise) if isinstance(self.kernel_noise, tuple)
                                 else self.kernel_noise),
                "fit_loo": self.fit_loo, "base_fit": self.base_fit, "y_scale": self.y_scale,
                "recalibrate": self.recalibrate, "kernel_std": self.kernel_std,
                "cubic_penalties": list(self.cubic_penalties),
                "bar_tail": self.bar_tail, "bar_tail_index": self.bar_tail_index,
                "recalibrate_width": self.recalibrate_width,
                "loo_intercept": self.loo_intercept}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _trunk_outputs(layer, n_layers: int, bar: bool, classify: bool, feats, y_loc, y_scale,
                   is_query):
    """The layers after the standardisation applied to its outputs: the model's outputs.
    layer(name) / layer("block", i) gives each layer (made or looked up)."""
    mask = layer("attention_mask")(is_query)  # (B, N, N)
    h = layer("embed")(feats)  # (B, N, D)
    for i in range(n_layers):
        h = layer("block", i)(h, mask)
    h = layer("ln_final")(h)
    if bar:
        return bar_outputs(layer("bar"), h, y_loc, y_scale, is_query, feats)
    out = layer("dense")(h)  # (B, N, dy): logits, or standardised units
    return out if classify else layer("destandardize")(out, y_loc, y_scale)


def standardizer_kwargs(m) -> dict:
    """The ContextStandardizer's fit and scale arguments of a model config (ModelConfig)."""
    return dict(ridge_penalties=m.ridge_penalties, kernel_length_scales=m.kernel_length_scales,
                kernel_noise=m.kernel_noises or m.kernel_noise, fit_loo=m.fit_loo,
                base_fit=m.base_fit, y_scale=m.y_scale, kernel_std=m.kernel_std,
                cubic_penalties=m.cubic_penalties, loo_intercept=m.loo_intercept)


def build_model(cfg: ExperimentConfig) -> InContextTransformer:
    """The in-context transformer of an experiment: its model config and task widths."""
    m, t = cfg.model, cfg.task
    return InContextTransformer(
        x_dim=t.x_dim, y_dim=t.y_dim, d_model=m.d_model, n_layers=m.n_layers,
        n_heads=m.n_heads, key_dim=m.key_dim, mlp_ratio=m.mlp_ratio, gelu=m.gelu,
        std_eps=m.std_eps,
        classify=t.kind == "classification", absent_features=m.absent_features,
        head=m.head, n_bins=m.n_bins, recalibrate=m.recalibrate, bar_tail=m.bar_tail,
        bar_tail_index=m.bar_tail_index, recalibrate_width=m.recalibrate_width,
        **standardizer_kwargs(m),
        name=cfg.name.replace("-", "_"))


INPUT_NAMES = ("x", "y", "is_query")


def masked_inputs(context_x, context_y, query_x) -> dict:
    """The model's inputs for context points followed by query points.

    Args: context_x [B, Nc, dx], context_y [B, Nc, dy], query_x [B, Nq, dx].
    Returns: {"x": [B, Nc+Nq, dx], "y": (queries zeroed), "is_query": [B, Nc+Nq]};
      predictions for the queries are rows Nc: of the output.
    """
    context_x = tf.convert_to_tensor(context_x, tf.float32)
    context_y = tf.convert_to_tensor(context_y, tf.float32)
    query_x = tf.convert_to_tensor(query_x, tf.float32)
    b, nc, nq = tf.shape(query_x)[0], tf.shape(context_x)[1], tf.shape(query_x)[1]
    dy = tf.shape(context_y)[2]
    return {"x": tf.concat([context_x, query_x], axis=1),
            "y": tf.concat([context_y, tf.zeros([b, nq, dy])], axis=1),
            "is_query": tf.concat([tf.zeros([b, nc]), tf.ones([b, nq])], axis=1)}


def model_inputs(batch: dict) -> dict:
    """The model's named inputs from a batch that may carry more keys (task_id)."""
    return {k: batch[k] for k in INPUT_NAMES}


def point_prediction(out):
    """The model's point prediction [B, N, dy] from its output (a tensor, or the bar
    head's dict)."""
    return out["y_pred"] if isinstance(out, dict) else out


def query_rows(out: dict, nc) -> dict:
    """The bar head's output dict at the rows from nc on (the queries): logits, y_pred,
    the tail warps (model.recalibrate) and, where they are per point, y_loc
    (model.base_fit) and y_scale (model.y_scale="loo_gp")."""
    rows = lambda v: v if v.shape[1] == 1 else v[:, nc:]  # [B, 1, dy] or [B, N, dy]
    out = dict(out, logits=out["logits"][:, nc:], y_pred=out["y_pred"][:, nc:],
               y_loc=rows(out["y_loc"]), y_scale=rows(out["y_scale"]))
    if "tails" in out:
        out["tails"] = out["tails"][:, nc:]
    return out


def bar_distribution(model) -> Optional[BarDistribution]:
    """The bar head's distribution (standardised units), or None for an mse head."""
    if getattr(model, "head", "mse") != "bar":
        return None
    return model.get_layer("bar").distribution()


class Predictive:
    """A bar head's predictive distributions on the raw scale of y.

    Args:
      bars: the head's BarDistribution (standardised units).
      out: the model's output dict (logits [B, N, dy, K], y_loc, y_scale [B, 1, dy]; the
        tail warps [B, N, dy, 4, M] where the head is recalibrated).

    A context whose y do not vary (two or more points, all equal) carries no scale:
    as with one context point, and as the NLL loss trains it
    (`losses.query_nll_and_count`), the distribution is the head's in raw units of y
    around that value (`unit_scale`). (It was a point mass there: std 0 and log
    density -inf at any other value, so one such query made a suite's mean NLL
    infinite.) The mse head still predicts that value.
    """

    def __init__(self, bars: BarDistribution, out: dict):
        self.bars, self.logits, self.tails = bars, out["logits"], out.get("tails")
        self.loc, self.scale = out["y_loc"], unit_scale(out["y_scale"])

    def mean(self):
        return self.bars.mean(self.logits, self.tails) * self.scale + self.loc

    def std(self):
        return self.bars.stddev(self.logits, self.tails) * self.scale

    def quantiles(self, levels):
        """levels [L] -> [B, N, dy, L]."""
        qs = self.bars.quantiles(self.logits, tf.convert_to_tensor(levels, tf.float32),
                                 self.tails)
        return qs * self.scale[..., None] + self.loc[..., None]

    def _standardised(self, y):
        return (tf.cast(y, tf.float32) - self.loc) / self.scale

    def log_prob(self, y):
        """log density of y [B, N, dy] on the raw scale."""
        return (self.bars.log_prob(self.logits, self._standardised(y), self.tails)
                - tf.math.log(self.scale))

    def cdf(self, y):
        """P(Y <= y) for y [B, N, dy] (the probability integral transform at y)."""
        return self.bars.cdf(self.logits, self._standardised(y), self.tails)
