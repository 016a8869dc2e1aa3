"""The in-context transformer as a Keras functional model.

Inputs (named): x [B, N, dx], y [B, N, dy], is_query [B, N] (1 = query).
Output: y_pred [B, N, dy] on the raw scale of y (classification: class logits);
only query rows are meaningful.

Each point is one token built from (standardised x, standardised y zeroed on
queries, query flag). No positional encoding: a task is a set of points.
Every point attends only to context points (and itself), so each query is
predicted independently of the other queries.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from gpicl_tf.config import ExperimentConfig
from gpicl_tf.layers import (ContextAttentionMask, ContextStandardizer, Destandardize,
                             TransformerBlock)


def build_model(cfg: ExperimentConfig) -> keras.Model:
    """Builds the functional in-context transformer for `cfg`."""
    t, m = cfg.task, cfg.model
    classify = t.kind == "classification"
    x = keras.Input((None, t.x_dim), name="x")
    y = keras.Input((None, t.y_dim), name="y")
    is_query = keras.Input((None,), name="is_query")

    # Statistics and the output map stay in float32 under mixed precision.
    feats, y_loc, y_scale = ContextStandardizer(eps=m.std_eps, standardize_y=not classify,
                                                dtype="float32", name="standardize")(x, y, is_query)
    mask = ContextAttentionMask(name="attention_mask")(is_query)  # (B, N, N)
    h = keras.layers.Dense(m.d_model, name="embed")(feats)  # (B, N, D)
    res_scale = 1.0 / math.sqrt(2 * m.n_layers)
    for i in range(m.n_layers):
        h = TransformerBlock(m.d_model, m.n_heads, m.head_dim, m.mlp_ratio * m.d_model,
                             residual_scale=res_scale, name=f"block_{i}")(h, mask)
    h = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_final")(h)
    head = keras.layers.Dense(t.y_dim, kernel_initializer="zeros", dtype="float32",
                              name="y_pred" if classify else "head")
    y_pred = head(h)  # (B, N, dy): logits, or standardised units
    if not classify:
        y_pred = Destandardize(dtype="float32", name="y_pred")(y_pred, y_loc, y_scale)
    return keras.Model({"x": x, "y": y, "is_query": is_query}, y_pred, name=cfg.name.replace("-", "_"))


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
