"""`InContextRegressor`: a scikit-learn regressor backed by an exported in-context learner.

    from gpicl_tf import InContextRegressor
    reg = InContextRegressor().fit(X_train, y_train)   # the shipped model; stores the context
    reg = InContextRegressor("exports/gpicl")          # or an export, or a TF Serving URL
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

A model trained with the bar head (model.head="bar") predicts distributions:

    mean, std = reg.predict(X_test, return_std=True)
    lo, hi = reg.predict_quantiles(X_test, quantiles=[0.05, 0.95]).T
    median = reg.predict(X_test, output_type="median")

A linear base (`linear_base`): by default ("auto") the regressor decides by 5-fold
cross-validation on the context whether the model learns the context as given or
the residuals of a strongly shrunk ridge fit, whose prediction is then added back.
In-context learners fit near-linear data (much real tabular data) worse than ridge
regression does; the residuals leave them only what the line misses.

With context_strategy="subsets" the subsets' predictive distributions are
combined as an equal-weight mixture: its mean is the average mean, its variance
the mixture's, and its quantiles invert the mixture's CDF (by bisection).
"""

from __future__ import annotations

import copy
import os
import re
from typing import Optional

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from gpicl_tf.config import MAX_ABS_VALUE

LINEAR_BASES = ("auto", "ridge", "none")
# The linear base's ridge penalties, on standardised x and y (sklearn's alpha: on the sum of
# squared errors, so the shrinkage weakens as the context grows). Chosen on data the README's
# real-data table does not score (benchmarks/linear_base_selection.py: diabetes on other
# splits, wine's other 12 columns as targets): penalties from 10 hurt the nonlinear targets.
BASE_ALPHAS = np.logspace(2, 3, 13)
BASE_FOLDS = 5

_URL = re.compile(r"^(https?://[^/]+)/v1/models/([^/:]+)(?:/versions/(\d+))?/?$")
_GRPC = re.compile(r"^grpc://([^/]+:\d+)/([^/:]+)(?:/versions/(\d+))?/?$")


class _SavedModelBackend:
    def __init__(self, path: str, version: Optional[int]):
        from gpicl_tf.export import load_config, load_signatures, resolve_version, versions

        if not os.path.exists(os.path.join(path, "saved_model.pb")) and not versions(path):
            raise ValueError(f"model={path!r}: expected an export folder "
                             "(exports/<name> with integer versions, or one version "
                             "folder), or a TF Serving URL http://host:port/v1/models/<name>")
        vdir = resolve_version(path, version, cli=False)
        self.cfg = load_config(vdir)
        self._sigs = load_signatures(vdir)  # loaded once: the bar head's signatures too
        self.sig = self._sigs["serving_default"]

    def _run(self, name, cx, cy, qx, **extra):
        import tensorflow as tf

        sig = self._sigs[name]
        f32 = lambda a: tf.constant(a, tf.float32)
        out = sig(context_x=f32(cx), context_y=f32(cy), query_x=f32(qx),
                  **{k: f32(v) for k, v in extra.items()})
        return {k: v.numpy() for k, v in out.items()}

    def __call__(self, cx, cy, qx):
        return self._run("serving_default", cx, cy, qx)["mean"]

    def distribution(self, cx, cy, qx):
        return self._run("serving_default", cx, cy, qx)

    def quantiles(self, cx, cy, qx, levels):
        return self._run("quantiles", cx, cy, qx, levels=levels)["quantiles"]

    def cdf(self, cx, cy, qx, qy):
        return self._run("log_prob", cx, cy, qx, query_y=qy)["cdf"]

    def classify(self, cx, ids, qx):
        import tensorflow as tf

        out = self.sig(context_x=tf.constant(cx, tf.float32),
                       context_y=tf.constant(ids, tf.int64),
                       query_x=tf.constant(qx, tf.float32))
        return out["probabilities"].numpy()


class _ServingBackend:
    """A model on TF Serving: REST (http://host:port/v1/models/<name>) or gRPC
    (grpc://host:port/<name>)."""

    def __init__(self, url: str, version: Optional[int], timeout: float):
        from gpicl_tf.config import ExperimentConfig
        from gpicl_tf.serving import TFServingClient, TFServingGRPCClient

        m = _GRPC.match(url)
        client = TFServingGRPCClient if m else TFServingClient
        m = m or _URL.match(url)
        base, name, v = m.group(1), m.group(2), m.group(3)
        if v and version is not None and int(v) != version:
            raise ValueError(f"version={version}: the URL {url!r} names version {v}; expected "
                             "one of the two, or the same")
        self.client = client(base, name, int(v) if v else version, timeout=timeout)
        # Widths and the context limit come from the served model itself.
        self.cfg = ExperimentConfig.from_json(self.client.model_config())

    def _run(self, method, *args):
        from gpicl_tf.serving import ServingError

        try:
            return getattr(self.client, method)(*args)
        except ServingError as e:
            if e.status == 400:  # the signature refused the input: a data error
                raise ValueError(f"the served model refused the input: {e}") from None
            raise

    def __call__(self, cx, cy, qx):
        return self._run("predict", cx, cy, qx)

    def distribution(self, cx, cy, qx):
        return self._run("predict_distribution", cx, cy, qx)

    def quantiles(self, cx, cy, qx, levels):
        return self._run("quantiles", cx, cy, qx, levels)

    def cdf(self, cx, cy, qx, qy):
        return self._run("log_prob", cx, cy, qx, qy)["cdf"]

    def classify(self, cx, ids, qx):
        return self._run("classify", cx, ids, qx)


class _InContextMixin:
    """What both estimators share: the loaded model (a SavedModel or a TF Serving URL),
    pickling without it, and the input-width check."""

    model_kind = "regression"

    # -------------------------------------------------------------- backend
    def _backend(self):
        """The loaded model; reloaded when model, version or timeout changed (set_params)."""
        key = (self.model, self.version, self.timeout)
        backend = getattr(self, "_backend_obj", None)
        if backend is None or getattr(self, "_backend_key", None) != key:
            model = os.fspath(self.model) if isinstance(self.model, os.PathLike) else self.model
            if model is None:  # the model that comes with the package
                from gpicl_tf import pretrained

                model = pretrained.folder(
                    "classifier" if self.model_kind == "classification" else "regressor")
            if not isinstance(model, str) or not model:
                raise ValueError(f"model={self.model!r}: expected None (the shipped model), "
                                 "an export path or a TF Serving URL")
            if model.startswith(("http://", "https://", "grpc://")):
                if not (_URL.match(model) or _GRPC.match(model)):
                    raise ValueError(f"model={self.model!r}: expected a URL of the form "
                                     "http://host:port/v1/models/<name>[/versions/<v>] "
                                     "(REST) or grpc://host:port/<name>[/versions/<v>]")
                backend = _ServingBackend(model, self.version, self.timeout)
            else:
                backend = _SavedModelBackend(model, self.version)
            kind = backend.cfg.task.kind
            if kind != self.model_kind:
                other = "InContextClassifier" if kind == "classification" else \
                    "InContextRegressor"
                raise ValueError(f"model={self.model!r} is a {kind} model: expected a "
                                 f"{self.model_kind} model here; use {other}")
            self._backend_obj, self._backend_key = backend, key
        return backend

    def __getstate__(self):  # a loaded TF function does not pickle; reload lazily
        state = dict(self.__dict__)
        state.pop("_backend_obj", None)
        state.pop("_backend_key", None)
        return state

    count_params = ("n_subsets", "batch_size")  # integer parameters >= 1

    def _check_params(self):
        for name in self.count_params:
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an integer >= 1")
        if self.max_context is not None and (not isinstance(self.max_context, (int, np.integer))
                                             or self.max_context < 1):
            raise ValueError(f"max_context={self.max_context!r}: expected None or an integer >= 1")

    def _set_context_limit(self, cfg):
        """max_context_: max_context, capped at what the model was trained on."""
        limit = cfg.task.context_max
        self.max_context_ = min(self.max_context or limit, limit)

    def _subsets(self, n: int):
        """n_subsets random subsets of max_context_ of n context points (random_state)."""
        rng = np.random.default_rng(self.random_state)
        return [rng.choice(n, self.max_context_, replace=False) for _ in range(self.n_subsets)]

    def _check_width(self, X, cfg):
        lo, hi = cfg.task.x_dim_min, cfg.task.x_dim
        if not lo <= X.shape[1] <= hi:
            want = f"{hi}" if lo == hi else f"from {lo} to {hi} (it reads at most {hi})"
            raise ValueError(f"X has {X.shape[1]} features, but the model {self.model!r} "
                             f"expects {want}")

    def _queries(self, X):
        """X checked and standardised like the context."""
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
        return Xs


class InContextRegressor(_InContextMixin, RegressorMixin, BaseEstimator):
    """A regressor that learns in context: fit stores points, predict runs the model.

    Args:
      model: None (the default): the regressor that comes with the package
        (gpicl_tf.pretrained); or an export folder (exports/<name>), a version
        folder, or a TF Serving URL: REST "http://host:port/v1/models/<name>
        [/versions/<v>]" or gRPC "grpc://host:port/<name>[/versions/<v>]".
      version: export version (default: the highest); refused beside a version folder,
        or beside a URL naming another version.
      max_context: most context points per call (default: the model's trained maximum).
      context_strategy: "nearest" or "subsets", for larger training sets.
      n_subsets: random subsets averaged with context_strategy="subsets".
      batch_size: queries per model call.
      random_state: seed of the random subsets and feature orders.
      timeout: seconds per request to TF Serving.
      n_permutations: an ensemble over this many orders of X's columns (the first the
        given order, the others random): the model reads features by position, so each
        order is another learner; means are averaged and distributions mixed, as over
        subsets. Costs n_permutations model calls.
      linear_base: "auto" (default), "ridge" or "none". With "ridge" the model reads
        the residuals of a ridge fit to the context (penalty chosen by RidgeCV from
        `BASE_ALPHAS`, on standardised x and y: strong shrinkage) and the fit's
        prediction is added to its mean and quantiles (the spread is the model's).
        "auto" picks "ridge" or "none", whichever has the lower squared error in
        5-fold cross-validation on the context (seeded by random_state; "none" below
        10 points); it costs 10 more predictions of the folds at fit.
        Attributes after fit: linear_base_ (the choice) and cv_errors_ (the two
        cross-validated sums of squared errors with "auto", else None).
    """

    count_params = _InContextMixin.count_params + ("n_permutations",)

    def __init__(self, model: Optional[str] = None, version: Optional[int] = None,
                 max_context: Optional[int] = None, context_strategy: str = "nearest",
                 n_subsets: int = 8, batch_size: int = 256, random_state: int = 0,
                 timeout: float = 10.0, n_permutations: int = 1, linear_base: str = "auto"):
        self.model = model
        self.version = version
        self.max_context = max_context
        self.context_strategy = context_strategy
        self.n_subsets = n_subsets
        self.batch_size = batch_size
        self.random_state = random_state
        self.timeout = timeout
        self.n_permutations = n_permutations
        self.linear_base = linear_base

    def _check_params(self):
        if self.context_strategy not in ("nearest", "subsets"):
            raise ValueError(f"context_strategy={self.context_strategy!r}: expected 'nearest' "
                             "or 'subsets'")
        if not isinstance(self.linear_base, str) or self.linear_base not in LINEAR_BASES:
            raise ValueError(f"linear_base={self.linear_base!r}: expected one of "
                             f"{list(LINEAR_BASES)}")
        super()._check_params()

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
        self._check_width(X, cfg)
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
        self._set_context_limit(cfg)
        self.linear_base_, self.cv_errors_ = self._choose_base(X, Y)
        cy = (Y - self._y_loc) / self._y_scale
        self._base_fit = _ridge_base(self._cx, cy) if self.linear_base_ == "ridge" else None
        self._cy = cy - self._base(self._cx)
        return self

    def _base(self, Xs):
        """The linear base's prediction for standardised Xs, in standardised units of y:
        [m, dy] (zeros without a base)."""
        if self._base_fit is None:
            return np.zeros((len(Xs), self.y_context_.shape[1]))
        coef, intercept = self._base_fit
        return Xs @ coef.T + intercept

    def _choose_base(self, X, Y):
        """(linear_base_, cv_errors_): linear_base itself, or with "auto" the base of lower
        5-fold cross-validated squared error on the context (X, Y [n, dy])."""
        if self.linear_base != "auto":
            return self.linear_base, None
        n = len(X)
        if n < 2 * BASE_FOLDS:
            return "none", None
        folds = np.array_split(np.random.default_rng(self.random_state).permutation(n),
                               BASE_FOLDS)
        errors = {}
        for base in ("none", "ridge"):
            member = copy.copy(self)  # shares the loaded model
            member.linear_base = base
            errors[base] = 0.0
            for test in folds:
                train = np.setdiff1d(np.arange(n), test)
                pred = member.fit(X[train], Y[train]).predict(X[test])
                errors[base] += float(np.sum((pred.reshape(Y[test].shape) - Y[test]) ** 2))
        return ("ridge" if errors["ridge"] < errors["none"] else "none"), errors

    def predict(self, X, return_std: bool = False, output_type: str = "mean",
                quantiles=None):
        """Predicted y for X: [m] (1-D y at fit) or [m, dy].

        Args:
          return_std: also return the predictive standard deviation (bar head).
          output_type: "mean", "median" or "quantiles" (TabPFN's contract: a list
            with one array per level of `quantiles`); all but "mean" need the bar head.
          quantiles: levels for output_type="quantiles" (default 0.1, 0.2, ..., 0.9).
        Returns: the mean, (mean, std) with return_std, the median, or a list of
          quantile arrays.
        """
        if output_type not in ("mean", "median", "quantiles"):
            raise ValueError(f"output_type={output_type!r}: expected 'mean', 'median' or "
                             "'quantiles'")
        if output_type != "mean" or return_std:
            what = "return_std=True" if return_std else f"output_type={output_type!r}"
            self._require_distribution(what)
        if output_type == "median":
            return self.predict_quantiles(X, [0.5])[..., 0]
        if output_type == "quantiles":
            levels = np.arange(1, 10) / 10 if quantiles is None else quantiles
            qs = self.predict_quantiles(X, levels)
            return [qs[..., j] for j in range(qs.shape[-1])]
        Xs = self._queries(X)
        if not return_std:
            return self._out(self._chunks(Xs, self._mean_chunk) + self._base(Xs), loc=True)
        both = self._chunks(Xs, self._mean_std_chunk, (2,))  # (m, dy, 2)
        return (self._out(both[..., 0] + self._base(Xs), loc=True),
                self._out(both[..., 1], loc=False))

    def predict_quantiles(self, X, quantiles=(0.05, 0.5, 0.95)):
        """Quantiles of the predictive distribution: [m, L] (1-D y at fit) or [m, dy, L].

        quantiles: levels, each strictly between 0 and 1. Needs the bar head.
        """
        from gpicl_tf.distributions import check_levels

        try:
            levels = check_levels(quantiles)
        except ValueError as e:
            raise ValueError(f"quantiles: {e}") from None
        self._require_distribution("predict_quantiles")
        Xs = self._queries(X)
        qs = self._chunks(Xs, lambda xq: self._quantile_chunk(xq, levels),
                          (len(levels),))  # (m, dy, L)
        qs = (qs + self._base(Xs)[..., None]) * self._y_scale[:, None] + self._y_loc[:, None]
        return qs[:, 0] if self._y_1d else qs

    # ------------------------------------------------------------- helpers
    def _require_distribution(self, what: str):
        check_is_fitted(self, "X_context_")
        if self._backend().cfg.model.head != "bar":
            raise ValueError(f"{what}: the model {self.model!r} predicts a mean only "
                             "(model.head='mse'); expected a model trained with "
                             "model.head=bar, whose export predicts distributions")

    def _chunks(self, Xs, fn, tail=()):
        """fn over batches of batch_size queries, concatenated ([0, dy, *tail] for none)."""
        if not len(Xs):
            return np.zeros((0, self.y_context_.shape[1], *tail))
        return np.concatenate([fn(Xs[i:i + self.batch_size])
                               for i in range(0, len(Xs), self.batch_size)])

    def _out(self, a, loc: bool):
        """Standardised units of y to the raw scale, shaped as y was at fit."""
        a = a * self._y_scale + (self._y_loc if loc else 0.0)
        return a[:, 0] if self._y_1d else a

    def _contexts(self, Xq):
        """(how, contexts): "shared" with [(cx, cy)], "nearest" with per-query contexts
        [(cx [q, m, d], cy [q, m, dy])], or "subsets" with n_subsets shared contexts."""
        cx, cy, m = self._cx, self._cy, self.max_context_
        if len(cx) <= m:  # one shared context for every query
            return "shared", [(cx, cy)]
        if self.context_strategy == "nearest":
            d = np.sum((Xq[:, None, :] - cx[None]) ** 2, -1)  # (q, n), standardised x
            idx = np.argpartition(d, m - 1, axis=1)[:, :m]  # (q, m)
            return "nearest", [(cx[idx], cy[idx])]
        return "subsets", [(cx[s], cy[s]) for s in self._subsets(len(cx))]

    def _permutations(self, d: int):
        """The feature orders of the ensemble: the identity, then n_permutations - 1 random
        orders of the d columns (random_state); one order when d == 1."""
        rng = np.random.default_rng(self.random_state)
        orders = [np.arange(d)] + [rng.permutation(d) for _ in range(self.n_permutations - 1)]
        return orders[:1] if d == 1 else orders

    def _each(self, Xq, fn):
        """fn(cx, cy, qx) over the contexts of Xq and the feature orders of the ensemble; one
        result per member, each [q, ...]; how is "subsets" (a mixture) for several members."""
        how, contexts = self._contexts(Xq)
        out = []
        for order in self._permutations(Xq.shape[1]):
            if how == "nearest":
                (cx, cy), = contexts
                out.append(fn(cx[..., order], cy, Xq[:, None, order])[:, 0])
            else:
                out += [fn(c[None][..., order], y[None], Xq[None][..., order])[0]
                        for c, y in contexts]
        return ("subsets" if len(out) > 1 else how), out

    def _mean_chunk(self, Xq):
        """Predictions for standardised queries Xq, in standardised units of y."""
        _, means = self._each(Xq, self._backend())
        return np.mean(means, 0)

    def _mean_std_chunk(self, Xq):
        """Mean and std [q, dy, 2]: a mixture's over subsets."""
        def mean_std(cx, cy, qx):
            d = self._backend().distribution(cx, cy, qx)
            return np.stack([d["mean"], d["std"]], -1)

        _, outs = self._each(Xq, mean_std)
        outs = np.asarray(outs, np.float64)  # (S, q, dy, 2)
        mean = outs[..., 0].mean(0)
        var = np.mean(outs[..., 1] ** 2 + outs[..., 0] ** 2, 0) - mean ** 2
        return np.stack([mean, np.sqrt(np.maximum(var, 0.0))], -1)

    def _quantile_chunk(self, Xq, levels, iters: int = 40):
        """Quantiles [q, dy, L]; over subsets, the mixture's (its CDF inverted by bisection
        between the smallest and largest component quantile, which bracket it)."""
        run = self._backend()
        how, qs = self._each(Xq, lambda *a: run.quantiles(*a, levels))
        if how != "subsets":
            return qs[0]
        qs = np.asarray(qs, np.float64)  # (S, q, dy, L)
        lo, hi = qs.min(0), qs.max(0)
        n, dy, n_levels = lo.shape
        # Query i at level j becomes query i*L + j, so one call scores every level.
        xq = np.repeat(Xq, n_levels, axis=0)  # (q L, d)
        target = np.broadcast_to(levels, lo.shape)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            y = np.transpose(mid, (0, 2, 1)).reshape(n * n_levels, dy)
            _, cdfs = self._each(xq, lambda cx, cy, qx: run.cdf(cx, cy, qx, y[None]))
            f = np.mean(cdfs, 0).reshape(n, n_levels, dy).transpose(0, 2, 1)
            below = f < target
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags


class InContextClassifier(_InContextMixin, ClassifierMixin, BaseEstimator):
    """A classifier that learns in context: fit stores points, predict_proba runs the model.

    Args:
      model: None (the default): the classifier that comes with the package
        (gpicl_tf.pretrained); or an export folder of a classification model
        (`python train_keras.py --preset classify` writes exports/gpicl-classify), a
        version folder, or a TF Serving URL (http://... or grpc://..., as the regressor's).
      version: export version (default: the highest); refused beside a version folder,
        or beside a URL naming another version.
      max_context: most context points per call (default: the model's trained maximum).
      n_subsets: with more training points than that, the probabilities are averaged
        over this many random subsets of max_context points (a mixture).
      batch_size: queries per model call.
      random_state: seed of the random subsets and of the ensemble's members.
      timeout: seconds per request to TF Serving.
      n_permutations: an ensemble of this many members (the first the data as given),
        each with a random order of X's columns and a random assignment of the model's
        class ids: the model was trained on features in any order and on classes with
        random ids, so each member is another learner; their probabilities are averaged.
        The members of a call go to the model as one batch.

    Labels may be anything np.unique sorts (strings, integers): `classes_` holds them
    sorted. The model sees each class as an id in 0..C-1 (C = task.y_dim, the most
    classes it tells apart), given in an order that depends on the data only (the
    larger class first, ties by their mean feature vectors), never on the labels'
    names or the rows' order: renaming the classes permutes the probabilities' columns
    and changes nothing else. Classes absent from a context get probability 0.
    """

    model_kind = "classification"
    count_params = _InContextMixin.count_params + ("n_permutations",)

    def __init__(self, model: Optional[str] = None, version: Optional[int] = None,
                 max_context: Optional[int] = None, n_subsets: int = 8, batch_size: int = 256,
                 random_state: int = 0, timeout: float = 10.0, n_permutations: int = 1):
        self.model = model
        self.version = version
        self.max_context = max_context
        self.n_subsets = n_subsets
        self.batch_size = batch_size
        self.random_state = random_state
        self.timeout = timeout
        self.n_permutations = n_permutations

    def fit(self, X, y):
        """Stores (X, y) as the context. X: [n, d] (or [n]); y: [n] labels."""
        self._check_params()
        X = _as_2d(X)
        X, y = validate_data(self, X, y, dtype=np.float64, ensure_min_samples=1)
        check_classification_targets(y)
        cfg = self._backend().cfg
        self._check_width(X, cfg)
        self.classes_, index = np.unique(y, return_inverse=True)
        c = len(self.classes_)
        if c > cfg.task.y_dim:
            raise ValueError(f"y has {c} classes, but the model {self.model!r} tells at most "
                             f"{cfg.task.y_dim} apart (task.y_dim)")
        self._x_loc, self._x_scale = _loc_scale(X)
        # Model ids from the data alone: larger classes first, ties by mean feature vector.
        keys = [(-np.sum(index == j), *np.round(X[index == j].mean(0), 9)) for j in range(c)]
        order = sorted(range(c), key=lambda j: keys[j])
        self._class_of_id = np.asarray(order)  # id -> column of classes_
        id_of_class = np.argsort(self._class_of_id)
        self.X_context_, self._ids = X, id_of_class[index].astype(np.int64)
        self._cx = (X - self._x_loc) / self._x_scale
        self._set_context_limit(cfg)
        return self

    def predict_proba(self, X):
        """Class probabilities [m, n_classes], columns in the order of classes_."""
        Xs = self._queries(X)
        c = len(self.classes_)
        if not len(Xs):
            return np.zeros((0, c))
        out = np.concatenate([self._proba_chunk(Xs[i:i + self.batch_size])
                              for i in range(0, len(Xs), self.batch_size)])
        p = np.zeros((len(out), c))
        p[:, self._class_of_id] = out[:, :c]  # ids >= c never occur in the context: 0
        return p / p.sum(1, keepdims=True)

    def predict(self, X):
        """The most probable class of each row of X."""
        p = self.predict_proba(X)  # NotFittedError before classes_ is looked up
        return self.classes_[np.argmax(p, axis=1)]

    def _proba_chunk(self, Xq):
        cx, ids, m = self._cx, self._ids, self.max_context_
        run = self._backend()
        members = ensemble_members(np.random.default_rng(self.random_state), cx.shape[1],
                                   run.cfg.task.y_dim, self.n_permutations)
        if len(cx) <= m:
            return ensemble_proba(run.classify, cx, ids, Xq, members)
        return np.mean([ensemble_proba(run.classify, cx[s], ids[s], Xq, members)
                        for s in self._subsets(len(cx))], 0)


def ensemble_members(rng, d: int, n_ids: int, n: int):
    """n (feature order [d], class-id map [n_ids]) pairs: the identity, then random ones."""
    return [(np.arange(d), np.arange(n_ids))] + [(rng.permutation(d), rng.permutation(n_ids))
                                                 for _ in range(n - 1)]


def ensemble_proba(classify, cx, ids, qx, members):
    """Class probabilities [q, C] averaged over the members of an ensemble.

    classify(cx [K, n, d], ids [K, n], qx [K, q, d]) -> [K, q, C] is called once with a
    member per batch row: member (order, ids_map) sees the columns in `order` and class
    id i as ids_map[i], so its column ids_map[i] is the probability of id i.
    """
    p = classify(np.stack([cx[:, f] for f, _ in members]),
                 np.stack([c[ids] for _, c in members]),
                 np.stack([qx[:, f] for f, _ in members]))
    return np.mean([p[j][:, c] for j, (_, c) in enumerate(members)], 0)


def _ridge_base(Xs, Ys):
    """(coef [dy, d], intercept [dy]) of RidgeCV over BASE_ALPHAS on standardised data."""
    from sklearn.linear_model import RidgeCV

    fit = RidgeCV(alphas=BASE_ALPHAS).fit(Xs, Ys)
    return np.atleast_2d(fit.coef_), np.atleast_1d(fit.intercept_)


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


__all__ = ["InContextClassifier", "InContextRegressor"]
