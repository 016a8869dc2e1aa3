"""Base configs of the paper's experiments: presets `sweep-tiny` (tests), `sweep-small`
(2-core CPU) and `sweep-paper` (GPUs) of the one registry, `gpicl_tf.config.PRESETS`.

    gpicl-experiment phase-transition --family random_mlp --preset small
    gpicl-experiment phase-transition --family digits --preset small
    gpicl-experiment phase-transition --family mnist --preset paper --data-dir /data/tfds
"""

from __future__ import annotations

import dataclasses

from gpicl_tf.config import ExperimentConfig, apply_overrides, get_preset

SIZES = ("tiny", "small", "paper")
FAMILIES = ("random_mlp", "digits", "mnist", "fashion_mnist", "kmnist", "cifar10",
            "svhn_cropped")


def base_config(family: str, size: str, data_dir: str = "~/tensorflow_datasets",
                overrides=()) -> ExperimentConfig:
    """The experiment's base config; each setting overrides a few fields of it.

    random_mlp keeps the sweep preset's tasks; an image family becomes the
    paper's task augmentation of that dataset (classification).
    """
    if family not in FAMILIES:
        raise ValueError(f"--family {family!r} is unknown: expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"--preset {size!r} is unknown: expected one of {SIZES}")
    cfg = get_preset(f"sweep-{size}")
    if family != "random_mlp":
        x_dim = {"tiny": 16, "small": 32, "paper": 256}[size]
        task = dataclasses.replace(cfg.task, family="projected_labels", dataset=family,
                                   data_dir=data_dir, x_dim=x_dim, y_dim=10,
                                   standardize_y=False)
        cfg = dataclasses.replace(cfg, task=task)
    return apply_overrides(dataclasses.replace(cfg, name=f"{family}-{size}"), list(overrides))
