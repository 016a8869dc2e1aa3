"""TensorBoard summaries: scalars, HParams and pictures of predictions (drawn by evaluate)."""

from __future__ import annotations

import dataclasses
import io
from typing import Optional

import tensorflow as tf

from gpicl_tf.config import ExperimentConfig


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
        if self.writer is None or cfg.task.x_dim_min != 1 or cfg.task.kind != "regression":
            return
        from gpicl_tf.evaluate import prediction_figure  # evaluate imports this module

        img = figure_to_image(prediction_figure(model, cfg))
        with self.writer.as_default(step=step):
            tf.summary.image("eval/predictions_unseen_tasks", img)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
