"""TensorBoard summaries: scalars, HParams and pictures of predictions."""

from __future__ import annotations

import dataclasses
import io
from typing import Optional

import numpy as np
import tensorflow as tf

from gpicl_tf.config import ExperimentConfig, unseen_task_config


def flat_hparams(cfg: ExperimentConfig) -> dict:
    """The config as flat {section.field: scalar} for the HParams plugin."""
    out = {"name": cfg.name}
    for part in ("task", "model", "train"):
        for k, v in dataclasses.asdict(getattr(cfg, part)).items():
            if v is None:
                v = "none"
            elif isinstance(v, (tuple, list)):
                v = ",".join(str(e) for e in v)
            out[f"{part}.{k}"] = v
    return out


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def prediction_figure(model, cfg: ExperimentConfig, n_tasks: int = 3, n_context: int = 8,
                      seed: Optional[int] = None):
    """A matplotlib figure of in-context predictions on unseen 1-D tasks."""
    from gpicl_tf import data as data_lib

    plt = pyplot()

    grid = 200
    task = dataclasses.replace(unseen_task_config(cfg.task), n_points=n_context + grid,
                               max_context=None, min_context=0)
    b = data_lib.sample_batch(task, cfg.train.seed if seed is None else seed, n_tasks,
                              n_context=n_context, stream=data_lib.EVAL_STREAM + 1)
    pred = model({"x": b["x"], "y": b["y"], "is_query": b["is_query"]}).numpy()
    x, y, q = b["x"].numpy()[..., 0], b["y"].numpy()[..., 0], b["is_query"].numpy() > 0.5
    fig, axes = plt.subplots(1, n_tasks, figsize=(4 * n_tasks, 3.2), squeeze=False)
    for i, ax in enumerate(axes[0]):
        order = np.argsort(np.where(q[i], x[i], np.inf))[: q[i].sum()]
        ax.plot(x[i][order], y[i][order], color="0.4", lw=1.5, label="truth")
        ax.plot(x[i][order], pred[i, :, 0][order], color="C1", lw=1.5, label="model")
        ax.scatter(x[i][~q[i]], y[i][~q[i]], color="C0", zorder=3, s=18, label="context")
        ax.set_title(f"unseen task {i}, {n_context} context points", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_to_image(fig) -> tf.Tensor:
    """Renders a figure to a [1, H, W, 4] uint8 tensor for tf.summary.image."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return tf.image.decode_png(buf.getvalue(), channels=4)[None]


class Writer:
    """Summary writer of one run; a no-op when logdir is None (non-chief workers)."""

    def __init__(self, logdir: Optional[str], cfg: ExperimentConfig):
        self.cfg = cfg
        self.writer = tf.summary.create_file_writer(logdir) if logdir else None

    def hparams(self) -> None:
        if self.writer is None:
            return
        from tensorboard.plugins.hparams import api as hp

        with self.writer.as_default():
            hp.hparams(flat_hparams(self.cfg), trial_id=self.cfg.name)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is None:
            return
        with self.writer.as_default(step=step):
            for k, v in values.items():
                tf.summary.scalar(k, v)

    def predictions(self, step: int, model, cfg: ExperimentConfig) -> None:
        if self.writer is None or cfg.task.x_dim != 1 or cfg.task.kind != "regression":
            return
        img = figure_to_image(prediction_figure(model, cfg))
        with self.writer.as_default(step=step):
            tf.summary.image("eval/predictions_unseen_tasks", img)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
