"""`InContextRegressor`: a scikit-learn regressor backed by an exported in-context learner.

    from gpicl_tf import InContextRegressor
    reg = InContextRegressor("exports/gpicl").fit(X_train, y_train)   # stores the context
    reg.predict(X_test)

`fit` stores the training points as the context; `predict` runs the model (a
SavedModel folder, or a TF Serving URL such as
"http://localhost:8501/v1/models/gpicl") on them. Queries are independent, so
any number of them is sent in batches of `batch_size`.

More context points than the model was trained on (`max_context`, from the
export's config): with `context_strategy="nearest"` every query gets its own
context of the `max_context` training points nearest to it (in standardised
x); with `"subsets"` the prediction is the average over `n_subsets` random
subsets of `max_context` points.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from gpicl_tf.config import MAX_ABS_VALUE

_URL = re.compile(r"^(https?://[^/]+)/v1/models/([^/:]+)(?:/versions/(\d+))?/?$")


class _SavedModelBackend:
    def __init__(self, path: str, version: Optional[int]):
        from gpicl_tf.export import load_config, load_signature, resolve_version, versions

        vdir = path if os.path.exists(os.path.join(path, "saved_model.pb")) else None
        if vdir is None:
            if not versions(path):
                raise ValueError(f"model={path!r}: expected an export folder "
                                 "(exports/<name> with integer versions, or one version "
                                 "folder), or a TF Serving URL http://host:port/v1/models/<name>")
            vdir = resolve_version(path, version)
        self.cfg = load_config(vdir)
        self.sig = load_signature(vdir)

    def __call__(self, cx, cy, qx):
        import tensorflow as tf

        out = self.sig(context_x=tf.constant(cx, tf.float32),
                       context_y=tf.constant(cy, tf.float32),
                       query_x=tf.constant(qx, tf.float32))
        return out["mean"].numpy()


class _ServingBackend:
    def __init__(self, url: str, version: Optional[int], timeout: float):
        from gpicl_tf.serving import TFServingClient

        from gpicl_tf.config import ExperimentConfig

        m = _URL.match(url)
        base, name, v = m.group(1), m.group(2), m.group(3)
        self.client = TFServingClient(base, name, int(v) if v else version, timeout=timeout)
        # Widths and the context limit come from the served model itself.
        self.cfg = ExperimentConfig.from_json(self.client.model_config())

    def __call__(self, cx, cy, qx):
        from gpicl_tf.serving import ServingError

        try:
            return self.client.predict(cx, cy, qx)
        except ServingError as e:
            if e.status == 400:  # the signature refused the input: a data error
                raise ValueError(f"the served model refused the input: {e}") from None
            raise


class InContextRegressor(RegressorMixin, BaseEstimator):
    """A regressor that learns in context: fit stores points, predict runs the model.

    Args:
      model: export folder (exports/<name>), version folder, or TF Serving URL
        "http://host:port/v1/models/<name>[/versions/<v>]".
      version: export version (default: the highest).
      max_context: most context points per call (default: the model's trained maximum).
      context_strategy: "nearest" or "subsets", for larger training sets.
      n_subsets: random subsets averaged with context_strategy="subsets".
      batch_size: queries per model call.
      random_state: seed of the random subsets.
      timeout: seconds per request to TF Serving.
    """

    def __init__(self, model: str = "exports/gpicl", version: Optional[int] = None,
                 max_context: Optional[int] = None, context_strategy: str = "nearest",
                 n_subsets: int = 8, batch_size: int = 256, random_state: int = 0,
                 timeout: float = 10.0):
        self.model = model
        self.version = version
        self.max_context = max_context
        self.context_strategy = context_strategy
        self.n_subsets = n_subsets
        self.batch_size = batch_size
        self.random_state = random_state
        self.timeout = timeout

    # -------------------------------------------------------------- backend
    def _backend(self):
        """The loaded model; reloaded when model, version or timeout changed (set_params)."""
        key = (self.model, self.version, self.timeout)
        backend = getattr(self, "_backend_obj", None)
        if backend is None or getattr(self, "_backend_key", None) != key:
            model = os.fspath(self.model) if isinstance(self.model, os.PathLike) else self.model
            if not isinstance(model, str) or not model:
                raise ValueError(f"model={self.model!r}: expected an export path or a TF "
                                 "Serving URL")
            if model.startswith(("http://", "https://")):
                if not _URL.match(model):
                    raise ValueError(f"model={self.model!r}: expected a URL of the form "
                                     "http://host:port/v1/models/<name>[/versions/<v>]")
                backend = _ServingBackend(model, self.version, self.timeout)
            else:
                backend = _SavedModelBackend(model, self.version)
            self._backend_obj, self._backend_key = backend, key
        return backend

    def __getstate__(self):  # a loaded TF function does not pickle; reload lazily
        state = dict(self.__dict__)
        state.pop("_backend_obj", None)
        state.pop("_backend_key", None)
        return state

    def _check_params(self):
        if self.context_strategy not in ("nearest", "subsets"):
            raise ValueError(f"context_strategy={self.context_strategy!r}: expected 'nearest' "
                             "or 'subsets'")
        for name in ("n_subsets", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an integer >= 1")
        if self.max_context is not None and (not isinstance(self.max_context, (int, np.integer))
                                             or self.max_context < 1):
            raise ValueError(f"max_context={self.max_context!r}: expected None or an integer >= 1")

    # ------------------------------------------------------------------ API
    def fit(self, X, y):
        """Stores (X, y) as the context. X: [n, d] (or [n]); y: [n] or [n, dy]."""
        self._check_params()
        if not _numeric(y):
            raise ValueError("y: expected numeric regression targets, got strings or objects "
                             f"(dtype {np.asarray(y).dtype}); encode them as numbers")
        X = _as_2d(X)
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True,
                             dtype=np.float64, ensure_min_samples=1)
        self._y_1d = y.ndim == 1
        Y = y.reshape(len(y), -1)
        cfg = self._backend().cfg
        lo, hi = cfg.task.x_dim_min, cfg.task.x_dim
        if not lo <= X.shape[1] <= hi:
            want = f"{hi}" if lo == hi else f"from {lo} to {hi} (it reads at most {hi})"
            raise ValueError(f"X has {X.shape[1]} features, but the model {self.model!r} "
                             f"expects {want}")
        if Y.shape[1] != cfg.task.y_dim:
            raise ValueError(f"y has {Y.shape[1]} outputs, but the model {self.model!r} "
                             f"expects {cfg.task.y_dim}")
        # The model is equivariant to affine maps of x and y, so the data are
        # standardised here in float64 and predictions mapped back: any scale
        # and offset float64 holds reaches the float32 model intact.
        self._x_loc, self._x_scale = _loc_scale(X)
        self._y_loc, self._y_scale = _loc_scale(Y)
        self.X_context_, self.y_context_ = X, Y
        self._cx = (X - self._x_loc) / self._x_scale
        self._cy = (Y - self._y_loc) / self._y_scale
        limit = cfg.task.context_max
        self.max_context_ = min(self.max_context or limit, limit)
        return self

    def predict(self, X, return_std: bool = False):
        """Predicted y for X: [m] (1-D y at fit) or [m, dy]."""
        if return_std:
            raise ValueError("return_std=True: this model predicts a mean only (it has no "
                             "variance head); expected return_std=False")
        check_is_fitted(self, "X_context_")
        if self.n_features_in_ > 1 and np.asarray(X).ndim == 1:  # one sample or one feature?
            raise ValueError(f"X: expected a 2-D array of {self.n_features_in_} features, got a "
                             "1-D array. Reshape your data with X.reshape(1, -1) if it is a "
                             "single sample")
        X = _as_2d(X)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        Xs = (X - self._x_loc) / self._x_scale
        if len(X) and np.abs(Xs).max() > MAX_ABS_VALUE:
            raise ValueError("X: a query lies more than 1e36 context spreads from the context; "
                             "expected inputs on the scale of the fitted data")
        out = np.concatenate([self._predict_chunk(Xs[i:i + self.batch_size])
                              for i in range(0, len(X), self.batch_size)]) if len(X) else \
            np.zeros((0, self.y_context_.shape[1]))
        out = out * self._y_scale + self._y_loc
        return out[:, 0] if self._y_1d else out

    def _predict_chunk(self, Xq):
        """Predictions for standardised queries Xq, in standardised units of y."""
        cx, cy, m = self._cx, self._cy, self.max_context_
        run = self._backend()
        if len(cx) <= m:  # one shared context for every query
            return run(cx[None], cy[None], Xq[None])[0]
        if self.context_strategy == "nearest":
            d = np.sum((Xq[:, None, :] - cx[None]) ** 2, -1)  # (q, n), standardised x
            idx = np.argpartition(d, m - 1, axis=1)[:, :m]  # (q, m)
            return run(cx[idx], cy[idx], Xq[:, None, :])[:, 0]
        rng = np.random.default_rng(self.random_state)
        preds = [run(cx[s][None], cy[s][None], Xq[None])[0]
                 for s in (rng.choice(len(cx), m, replace=False) for _ in range(self.n_subsets))]
        return np.mean(preds, 0)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags


def _loc_scale(a):
    """Per-column mean and std (1 where a column is constant), in float64."""
    loc = a.mean(0)
    scale = a.std(0)
    return loc, np.where(scale > 0, scale, 1.0)


def _numeric(y) -> bool:
    """y holds numbers: a numeric dtype, or objects none of which is a string."""
    a = np.asarray(y)
    if a.dtype.kind == "O":
        return not any(isinstance(v, (str, bytes)) for v in a.ravel())
    return a.dtype.kind in "biufc"  # complex: validate_data says what is wrong


def _as_2d(X):
    """Accepts 1-D X as one feature; leaves everything else to check_array's messages."""
    if isinstance(X, (list, tuple)) or hasattr(X, "__array__"):
        a = np.asarray(X) if not hasattr(X, "iloc") else X
        if getattr(a, "ndim", 2) == 1:
            return np.asarray(a).reshape(-1, 1)
    return X


__all__ = ["InContextRegressor"]
