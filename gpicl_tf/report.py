"""Batches of unseen tasks with their context first, and model errors on them."""

from __future__ import annotations

import dataclasses
import numpy as np

from gpicl_tf import data as data_lib
from gpicl_tf.config import ExperimentConfig, unseen_task_config
from gpicl_tf.model import masked_inputs

REPORT_STREAM = data_lib.EVAL_STREAM + 7  # tasks no training run draws


def context_batch(cfg: ExperimentConfig, k: int, n_tasks: int, n_queries: int, seed: int,
                  family=None, stream: int = REPORT_STREAM, **task_overrides):
    """n_tasks unseen tasks, each with k context points first and n_queries queries.

    Returns numpy arrays x [T, k+q, dx], y [T, k+q, dy], is_query [T, k+q],
    with the context points placed first.
    """
    task = dataclasses.replace(unseen_task_config(cfg.task), n_points=k + n_queries,
                               min_context=0, max_context=None,
                               family=family or cfg.task.family, mix=(), **task_overrides)
    b = data_lib.sample_batch(task, seed, n_tasks, n_context=k, stream=stream)
    x, y, q = b["x"].numpy(), b["y"].numpy(), b["is_query"].numpy()
    order = np.argsort(q, axis=1, kind="stable")  # context (0) before queries (1)
    take = lambda a: np.take_along_axis(a, order[..., None] if a.ndim == 3 else order, 1)
    return take(x), take(y), take(q)


def model_mse(predict_fn, x, y, k: int):
    """Per-task MSE of predict_fn(context_x, context_y, query_x) -> [T, q, dy]."""
    pred = predict_fn(x[:, :k], y[:, :k], x[:, k:])
    return np.mean((pred - y[:, k:]) ** 2, axis=(1, 2))


def keras_predict_fn(model):
    """predict_fn over a Keras model with the masked-input interface."""

    def predict(cx, cy, qx):
        pred = model(masked_inputs(cx, cy, qx), training=False)
        return pred.numpy()[:, cx.shape[1]:]

    return predict
