"""Base datasets for classification tasks, through tensorflow-datasets.

Any prepared tfds image dataset can be a base (`mnist`, `fashion_mnist`,
`kmnist`, `cifar10`, `svhn_cropped`, ...): prepare it once where there is
network, then point `task.data_dir` at the folder. The package ships a tfds
builder for scikit-learn's bundled 8x8 digits (`digits`), which prepares
offline, so the whole path runs with no network:

    x, y = load_base("digits", data_dir="~/tensorflow_datasets")   # [1797, 64], [1797]
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import tensorflow_datasets as tfds

TFDS_IMAGE_DATASETS = ("mnist", "fashion_mnist", "kmnist", "cifar10", "svhn_cropped")
OFFLINE_DATASETS = ("digits",)
DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) as a tfds dataset.

    Built offline from the copy that scikit-learn ships: `train` holds the first
    1500 images, `test` the remaining 297.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From sklearn.datasets.load_digits."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="8x8 grey-level digits (0..16) from scikit-learn.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 1500),
                "test": self._generate_examples(1500, None)}

    def _generate_examples(self, start, stop):
        from sklearn.datasets import load_digits

        d = load_digits()
        images = d.images.astype(np.uint8)[..., None]
        for i in range(start, stop if stop is not None else len(images)):
            yield i, {"image": images[i], "label": int(d.target[i])}


def _builder(name: str, data_dir: str):
    data_dir = os.path.expanduser(data_dir)
    if name == "digits":
        return SklearnDigits(data_dir=data_dir)
    if name not in TFDS_IMAGE_DATASETS:
        raise ValueError(f"task.dataset={name!r} is unknown: expected one of "
                         f"{sorted(OFFLINE_DATASETS + TFDS_IMAGE_DATASETS)}")
    return tfds.builder(name, data_dir=data_dir)


def prepare(name: str, data_dir: str = DEFAULT_DATA_DIR) -> str:
    """Prepares a dataset into data_dir (downloads for all but `digits`)."""
    b = _builder(name, data_dir)
    b.download_and_prepare()
    return b.data_dir


@lru_cache(maxsize=8)
def load_base(name: str, data_dir: str = DEFAULT_DATA_DIR, split: str = "train"):
    """Flattened, standardised inputs [M, d] (float32) and labels [M] (int32).

    `digits` is prepared offline on first use. Any other dataset must already
    be prepared in data_dir; if not, a ValueError says how to prepare it (no
    download is attempted, nothing is written).
    """
    b = _builder(name, data_dir)
    if not b.is_prepared():
        if name in OFFLINE_DATASETS:
            b.download_and_prepare()
        else:
            raise ValueError(
                f"dataset {name!r} is not prepared in {os.path.expanduser(data_dir)!r}. "
                f"Prepare it on a machine with network access:\n"
                f"  python -c \"import gpicl_tf.datasets as d; d.prepare('{name}', "
                f"'{data_dir}')\"\n"
                f"then copy that folder here and name it with task.data_dir (training) "
                f"or --data-dir (gpicl-eval); task.dataset=digits needs no download.")
    ds = b.as_dataset(split=split, as_supervised=True)
    xs, ys = [], []
    for img, label in tfds.as_numpy(ds):
        xs.append(np.asarray(img, np.float32).reshape(-1))
        ys.append(int(label))
    x = np.stack(xs)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # per-feature standardisation
    return x.astype(np.float32), np.asarray(ys, np.int32)
