"""Masked-query loss, exact under data parallelism.

The loss of a global batch is the mean squared error over its query points:
sum over queries of |y - y_pred|^2 / dy, divided by the number of queries in
the *global* batch. Each replica divides its own sum by that global count, so
the replicas' losses (and gradients) add up to the exact global mean even when
replicas hold different numbers of queries.
"""

from __future__ import annotations

import tensorflow as tf

from gpicl_tf.layers import unit_scale


def task_variance(y, eps: float = 1e-6):
    """Variance of each task's y over all its points: [B, 1, dy]."""
    y = tf.cast(y, tf.float32)
    return tf.math.reduce_variance(y, axis=1, keepdims=True) + eps


def query_sse_and_count(y, y_pred, is_query, normalize: bool = False):
    """Sum of per-point MSE over query points, and the number of queries.

    Args:
      y, y_pred: [B, N, dy]; is_query: [B, N] (1 = query).
      normalize: divide each task's squared errors by the variance of its y
        over all its points, so tasks of every scale weigh the same
        (the "normalised MSE"; 1.0 is the error of predicting the task mean).
    Returns:
      (sse, count): float32 scalars.
    """
    q = tf.cast(is_query, tf.float32)
    sq = tf.square(tf.cast(y, tf.float32) - tf.cast(y_pred, tf.float32))  # (B, N, dy)
    if normalize:
        sq = sq / task_variance(y)
    err = tf.reduce_mean(sq, -1)  # (B, N)
    return tf.reduce_sum(err * q), tf.reduce_sum(q)


def query_nll_and_count(y, out, is_query, bars):
    """Sum over query points of the bar head's negative log-likelihood, and the count.

    The likelihood is that of the standardised y, z = (y - y_loc) / y_scale (scale 1
    where the context's y do not vary), averaged over the dy outputs: the log
    Jacobian of the standardisation does not depend on the weights, so this trains
    the raw-scale likelihood.

    Args: y [B, N, dy]; out: the bar model's output dict (logits [B, N, dy, K],
      y_loc, y_scale [B, 1, dy], the tail warps where recalibrated); is_query [B, N];
      bars: the head's BarDistribution.
    """
    q = tf.cast(is_query, tf.float32)
    scale = unit_scale(out["y_scale"])
    # The gradient of the NLL w.r.t. the logits is bounded (a softmax over bins); only
    # its value grows as z^2 in the tails. Clipping z keeps that value finite in float32
    # when a context's y barely vary, and changes no gradient.
    z = tf.clip_by_value((tf.cast(y, tf.float32) - out["y_loc"]) / scale, -1e6, 1e6)
    nll = -tf.reduce_mean(bars.log_prob(out["logits"], z, out.get("tails")), -1)  # (B, N)
    return tf.reduce_sum(nll * q), tf.reduce_sum(q)


def query_loss_and_count(y, y_pred, is_query, loss: str, bars=None):
    """Summed per-point loss over query points and the query count.

    loss: "mse", "normalized_mse", "cross_entropy" (y one-hot, y_pred logits) or
    "nll" (y_pred the bar model's output dict, bars its BarDistribution). The
    squared errors of a bar model are those of its mean.
    """
    if loss == "nll":
        return query_nll_and_count(y, y_pred, is_query, bars)
    if isinstance(y_pred, dict):
        y_pred = y_pred["y_pred"]
    if loss != "cross_entropy":
        return query_sse_and_count(y, y_pred, is_query, loss == "normalized_mse")
    q = tf.cast(is_query, tf.float32)
    ce = tf.nn.softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.float32),
                                                 logits=tf.cast(y_pred, tf.float32))  # (B, N)
    return tf.reduce_sum(ce * q), tf.reduce_sum(q)


def query_accuracy(y, y_pred, is_query):
    """Fraction of query points whose arg-max class is right (classification)."""
    q = tf.cast(is_query, tf.float32)
    hit = tf.cast(tf.equal(tf.argmax(y, -1), tf.argmax(y_pred, -1)), tf.float32)
    return tf.reduce_sum(hit * q) / tf.maximum(tf.reduce_sum(q), 1.0)


def masked_query_loss(y, y_pred, is_query, loss: str = "mse", global_count=None, bars=None):
    """The loss over query points, divided by `global_count` (the training loss).

    Inside a replica context, pass the all-reduced query count of the global
    batch; without it the local count is used (single device, evaluation).
    bars: the bar head's BarDistribution, for loss="nll".
    """
    total, count = query_loss_and_count(y, y_pred, is_query, loss, bars)
    denom = count if global_count is None else global_count
    return total / tf.maximum(denom, 1.0)
