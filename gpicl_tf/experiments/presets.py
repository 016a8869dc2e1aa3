"""Base configs of the paper's experiments: `small` (2-core CPU), `paper` (GPUs), `tiny` (tests).

    gpicl-experiment phase-transition --family random_mlp --preset small
    gpicl-experiment phase-transition --family digits --preset small
    gpicl-experiment phase-transition --family mnist --preset paper --data-dir /data/tfds
"""

from __future__ import annotations

from gpicl_tf.config import (ExperimentConfig, ModelConfig, TaskConfig, TrainConfig,
                             apply_overrides)

SIZES = ("tiny", "small", "paper")
FAMILIES = ("random_mlp", "digits", "mnist", "fashion_mnist", "kmnist", "cifar10",
            "svhn_cropped")


def _task(family: str, size: str, data_dir: str) -> TaskConfig:
    n_points = {"tiny": 16, "small": 48, "paper": 100}[size]
    if family == "random_mlp":
        return TaskConfig(n_points=n_points)
    # Classification: the paper's task augmentation of an image dataset.
    x_dim = {"tiny": 16, "small": 32, "paper": 256}[size]
    return TaskConfig(family="projected_labels", dataset=family, data_dir=data_dir,
                      x_dim=x_dim, y_dim=10, n_points=n_points, standardize_y=False)


def base_config(family: str, size: str, data_dir: str = "~/tensorflow_datasets",
                overrides=()) -> ExperimentConfig:
    """The experiment's base config; each setting overrides a few fields of it."""
    if family not in FAMILIES:
        raise ValueError(f"--family {family!r} is unknown: expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"--preset {size!r} is unknown: expected one of {SIZES}")
    model = {"tiny": ModelConfig(d_model=32, n_layers=2, n_heads=2, mlp_ratio=2),
             "small": ModelConfig(d_model=64, n_layers=2, n_heads=4, mlp_ratio=2),
             "paper": ModelConfig(d_model=256, n_layers=4, n_heads=8, key_dim=32)}[size]
    train = {"tiny": TrainConfig(steps=60, batch_size=32, warmup_steps=10, learning_rate=2e-3,
                                 steps_per_call=10, log_every=10, eval_every=60,
                                 checkpoint_every=30, eval_tasks=64),
             "small": TrainConfig(steps=1500, batch_size=64, warmup_steps=100,
                                  learning_rate=1e-3, steps_per_call=10, log_every=25,
                                  eval_every=500, checkpoint_every=500, eval_tasks=256),
             "paper": TrainConfig(steps=50000, batch_size=128, warmup_steps=1000,
                                  learning_rate=3e-4, steps_per_call=50, log_every=250,
                                  eval_every=2500, checkpoint_every=2500)}[size]
    cfg = ExperimentConfig(name=f"{family}-{size}", task=_task(family, size, data_dir),
                           model=model, train=train)
    return apply_overrides(cfg, list(overrides))
