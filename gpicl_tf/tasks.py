"""Task families: random functions drawn in-graph from stateless seeds.

A family draws one function from a seed (`sample_function`) and evaluates it
on inputs (`evaluate`); `sample_y` combines both, and families whose samples
are defined jointly on the inputs (Gaussian processes) override it. Every
draw is a pure TensorFlow function of an explicit `[2]` int32 seed, so the
same seed gives the same function on any machine and inside tf.data.

Families are looked up by name in `FAMILIES`:

    fam = get_family("sine")(task_config)
    y = fam.sample_y(fn_seed, x)        # x: [N, dx] -> y: [N, dy]
"""

from __future__ import annotations

import math

import numpy as np


class _LazyTensorFlow:
    """`tensorflow`, imported on first use: validating a config (and a CLI's
    --help or --print-config) needs the registry, not TensorFlow."""

    def __getattr__(self, name):
        import tensorflow

        return getattr(tensorflow, name)


tf = _LazyTensorFlow()

FAMILIES: dict = {}


def register_family(name: str):
    """Class decorator that adds a family to the registry under `name`."""

    def wrap(cls):
        cls.name = name
        FAMILIES[name] = cls
        return cls

    return wrap


def get_family(name: str):
    """Returns the family class registered as `name`."""
    if name not in FAMILIES:
        raise ValueError(f"task family {name!r} is unknown: expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


_ACT = {
    "tanh": lambda h: tf.tanh(h),
    "swish": lambda h: tf.nn.silu(h),
    "relu": lambda h: tf.nn.relu(h),
    "gelu": lambda h: tf.nn.gelu(h),
    "sigmoid": lambda h: tf.sigmoid(h),
    "sin": lambda h: tf.sin(h),
    "linear": lambda h: h,
}


WIDTH_SEED = 0x71D  # folded into an example block's x seed to draw its input widths


def present_features(x):
    """[U, 1, D] 1.0 where a feature is non-zero at some point of the example, else 0.0."""
    return tf.cast(tf.reduce_any(x != 0.0, axis=1, keepdims=True), x.dtype)


def weight_logits(weights):
    """Logits [1, C] of the categorical distribution with probabilities weights / sum."""
    return tf.math.log(tf.constant([[float(w) for w in weights]], tf.float32))


def draw_index(logits, seed, u: int):
    """Index of each of u examples drawn from the probabilities exp(logits) [1, C]: [U]."""
    return tf.cast(tf.random.stateless_categorical(tf.tile(logits, [u, 1]), 1, seed)[:, 0],
                   tf.int32)


def pick_outputs(pick, weights, makers, shape):
    """Row i of the output of makers[pick[i]]: [U, ...] of the given shape.

    Equal to gathering row i from all outputs stacked, but a maker whose weight
    is 0 (never picked) is not built, and a maker no row picked is not run: the
    task stream's values are unchanged and it costs only what its draws use.
    """
    out = tf.zeros(shape)
    for c, (w, make) in enumerate(zip(weights, makers)):
        if w <= 0:
            continue
        used = tf.equal(pick, c)
        made = tf.cond(tf.reduce_any(used), make, lambda: tf.zeros(shape))
        out = tf.where(tf.reshape(used, [-1] + [1] * (made.shape.rank - 1)), made, out)
    return out


def uniform_index(seed, shape, n):
    """Integers uniform in 0..n-1 (n an int tensor broadcasting against shape)."""
    u = tf.random.stateless_uniform(shape, seed)
    return tf.minimum(tf.cast(u * tf.cast(n, tf.float32), tf.int32), n - 1)


def split(seed, n: int):
    """Splits a [2] seed into n independent [2] seeds: [n, 2]."""
    return tf.random.experimental.stateless_split(seed, num=n)


class TaskFamily:
    """Base class for a family of random functions, sampled in blocks.

    A block is U examples drawn together: every parameter tensor of a block
    carries a leading U dimension (each example is its own function), inputs
    are [U, N, x_dim] and outputs [U, N, y_dim].
    """

    name = "base"
    kind = "regression"
    # Whether a function, once drawn, can be evaluated at any new input, which
    # a fixed pool of functions (n_tasks=T) needs.
    supports_pool = True
    # Whether the family draws its inputs itself (with the labels), not by sample_x.
    own_x = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.x_dim = cfg.x_dim
        self.y_dim = cfg.y_dim

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.n_tasks is not None and not cls.supports_pool:
            raise ValueError(f"task.n_tasks={cfg.n_tasks!r} is invalid for family "
                             f"{cls.name!r}: its functions are sampled jointly on the inputs "
                             "and cannot form a fixed pool; expected n_tasks=None")

    def sample_x(self, seed, u: int, n: int, x_low=None, x_high=None):
        """Inputs [U, N, x_dim] ~ U(x_low, x_high); with task.min_x_dim, example i
        keeps its first d_i features (d_i ~ U[min_x_dim, x_dim], or drawn with
        task.x_dim_weights) and the rest are 0."""
        lo = self.cfg.x_low if x_low is None else x_low
        hi = self.cfg.x_high if x_high is None else x_high
        x = tf.random.stateless_uniform([u, n, self.x_dim], seed, lo, hi)
        return width_mask(x, seed, self.cfg)

    def sample_function(self, seed, u: int):
        """Parameters of U functions, each tensor with a leading U dimension."""
        raise NotImplementedError

    def evaluate(self, params, x):
        """Values [U, N, y_dim] of the U functions at x [U, N, x_dim]."""
        raise NotImplementedError

    def sample_y(self, seed, x):
        """Draws U fresh functions from one seed and evaluates them at x."""
        return self.evaluate(self.sample_function(seed, x.shape[0]), x)

    def sample_y_from_seeds(self, seeds, x):
        """Function i drawn from its own seeds[i] (the task pool): [U, N, y_dim]."""
        return self.evaluate(self.params_from_seeds(seeds), x)

    def params_from_seeds(self, seeds):
        """Parameters of len(seeds) functions, function i drawn from seeds[i]."""
        parts = [self.sample_function(s, 1) for s in seeds]
        return tf.nest.map_structure(lambda *t: tf.concat(t, axis=0), *parts)

    def sample_xy(self, x_seed, u: int, n: int, fn_seed=None, fn_seeds=None, x_low=None,
                  x_high=None):
        """A block of u examples: x [U, N, dx], y [U, N, dy].

        The functions come from one seed (fresh tasks) or one seed each
        (`fn_seeds`, the task pool); the inputs from x_seed.
        """
        x = self.sample_x(x_seed, u, n, x_low, x_high)
        if fn_seeds is not None:
            return x, self.sample_y_from_seeds(fn_seeds, x)
        return x, self.sample_y(fn_seed, x)


@register_family("random_mlp")
class RandomMLP(TaskFamily):
    """A random MLP per task: x_dim -> hidden... -> y_dim, weights ~ N(0, s^2)."""

    def sample_function(self, seed, u):
        widths = [self.x_dim, *self.cfg.mlp_hidden, self.y_dim]
        seeds = split(seed, 2 * (len(widths) - 1))
        s = self.cfg.weight_scale
        params = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            w = tf.random.stateless_normal([u, a, b], seeds[2 * i], stddev=s)  # (U, in, out)
            bias = tf.random.stateless_normal([u, 1, b], seeds[2 * i + 1], stddev=s)
            params.append((w, bias))
        return params

    def evaluate(self, params, x):
        acts = self.cfg.mlp_activations
        h = x
        for i, (w, b) in enumerate(params):
            h = tf.matmul(h, w) + b  # (U, N, out)
            if i < len(params) - 1:
                h = _ACT[acts[i % len(acts)]](h)
        return h


@register_family("sine")
class Sine(TaskFamily):
    """y = A sin(f * mean(x) + p), A ~ U(0.1, 5), f ~ U(0, 8), p ~ U(0, 3) per output."""

    def sample_function(self, seed, u):
        s = split(seed, 3)
        amp = tf.random.stateless_uniform([u, 1, self.y_dim], s[0], 0.1, 5.0)
        freq = tf.random.stateless_uniform([u, 1, self.y_dim], s[1], 0.0, 8.0)
        phase = tf.random.stateless_uniform([u, 1, self.y_dim], s[2], 0.0, 3.0)
        return amp, freq, phase

    def evaluate(self, params, x):
        amp, freq, phase = params
        v = tf.reduce_mean(x, axis=-1, keepdims=True)  # (U, N, 1)
        return amp * tf.sin(freq * v + phase)


@register_family("linear")
class Linear(TaskFamily):
    """y = x W + b with slope W ~ N(0, 1) and intercept b ~ N(0, 1)."""

    def sample_function(self, seed, u):
        s = split(seed, 2)
        w = tf.random.stateless_normal([u, self.x_dim, self.y_dim], s[0])
        b = tf.random.stateless_normal([u, 1, self.y_dim], s[1])
        return w, b

    def evaluate(self, params, x):
        w, b = params
        return tf.matmul(x, w) + b


@register_family("polynomial")
class Polynomial(TaskFamily):
    """y = sum_k c_k v^k, degree 3, c_k ~ N(0, 1), v the mean of x."""

    degree = 3

    def sample_function(self, seed, u):
        return tf.random.stateless_normal([u, self.degree + 1, self.y_dim], seed)

    def evaluate(self, params, x):
        v = tf.reduce_mean(x, axis=-1, keepdims=True)  # (U, N, 1)
        powers = tf.concat([v**k for k in range(self.degree + 1)], axis=-1)  # (U, N, deg+1)
        return tf.matmul(powers, params)


@register_family("step")
class Step(TaskFamily):
    """Piecewise constant: 3 random thresholds on mean(x), levels ~ N(0, 1)."""

    n_steps = 3

    def sample_function(self, seed, u):
        s = split(seed, 2)
        cuts = tf.random.stateless_uniform([u, 1, self.n_steps], s[0], self.cfg.x_low,
                                           self.cfg.x_high)
        levels = tf.random.stateless_normal([u, self.n_steps + 1, self.y_dim], s[1])
        return cuts, levels

    def evaluate(self, params, x):
        cuts, levels = params
        v = tf.reduce_mean(x, axis=-1, keepdims=True)  # (U, N, 1)
        idx = tf.reduce_sum(tf.cast(v > cuts, tf.int32), axis=-1)  # (U, N)
        return tf.gather(levels, idx, batch_dims=1)  # (U, N, dy)


def rbf_kernel(x1, x2, length_scale):
    """RBF kernel exp(-|x1 - x2|^2 / (2 l^2)): [..., N1, N2] for x1 [..., N1, d]."""
    d2 = tf.reduce_sum(tf.square(x1[..., :, None, :] - x2[..., None, :, :]), axis=-1)
    return tf.exp(-0.5 * d2 / (length_scale**2))


@register_family("gp_rbf")
class GPRBF(TaskFamily):
    """Exact samples of a zero-mean, unit-variance GP with an RBF kernel."""

    supports_pool = False
    jitter = 1e-5

    def sample_y(self, seed, x):
        u, n = x.shape[0], tf.shape(x)[1]
        k = rbf_kernel(tf.cast(x, tf.float64), tf.cast(x, tf.float64), self.cfg.gp_length_scale)
        k += self.jitter * tf.eye(n, dtype=tf.float64)
        chol = tf.linalg.cholesky(k)  # (U, N, N)
        z = tf.random.stateless_normal([u, n, self.y_dim], seed, dtype=tf.float64)
        return tf.cast(tf.matmul(chol, z), tf.float32)  # (U, N, dy)


@register_family("projected_labels")
class ProjectedLabels(TaskFamily):
    """Classification tasks from a base dataset (the paper's task augmentation).

    A task is a random linear projection A (entries ~ N(0, 1/d), d the flattened
    input size) of the base inputs to x_dim, and a random permutation of the
    labels. Examples are drawn uniformly from the base split; y is the one-hot
    permuted label (y_dim = number of classes).
    """

    kind = "classification"
    own_x = True

    def __init__(self, cfg):
        super().__init__(cfg)
        from gpicl_tf.datasets import load_base

        x, labels = load_base(cfg.dataset, cfg.data_dir, cfg.split)
        self.base_x = tf.constant(x)  # (M, d)
        self.base_y = tf.constant(labels)  # (M,)
        self.d_in = x.shape[1]
        order = np.argsort(labels, kind="stable")  # examples grouped by class
        counts = np.bincount(labels, minlength=int(labels.max()) + 1)
        self.sorted_x = tf.constant(x[order])
        self.class_start = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]), tf.int32)
        self.class_count = tf.constant(counts, tf.int32)

    @classmethod
    def check_config(cls, cfg) -> None:
        from gpicl_tf.config import DATASET_CLASSES as N_CLASSES

        super().check_config(cfg)
        n_cls = N_CLASSES.get(cfg.dataset)
        if n_cls is None:
            raise ValueError(f"task.dataset={cfg.dataset!r} is unknown: expected one of "
                             f"{sorted(N_CLASSES)}")
        if cfg.y_dim != n_cls:
            raise ValueError(f"task.y_dim={cfg.y_dim} is invalid for dataset {cfg.dataset!r}: "
                             f"expected its number of classes, {n_cls}")
        if cfg.standardize_y:
            raise ValueError("task.standardize_y=True is invalid for classification: expected "
                             "false (y is one-hot)")

    def sample_function(self, seed, u):
        s = split(seed, 2)
        proj = tf.random.stateless_normal([u, self.d_in, self.x_dim], s[0],
                                          stddev=self.d_in**-0.5)  # (U, d, dx)
        keys = tf.random.stateless_uniform([u, self.y_dim], s[1])
        perm = tf.argsort(keys, axis=-1)  # (U, C): a bijection of the labels
        return proj, perm

    def sample_xy(self, x_seed, u, n, fn_seed=None, fn_seeds=None, x_low=None, x_high=None):
        proj, perm = (self.params_from_seeds(fn_seeds) if fn_seeds is not None
                      else self.sample_function(fn_seed, u))
        if self.cfg.classes_min < self.y_dim:
            raw, label = self._some_classes(x_seed, u, n, perm)
        else:  # every class, examples drawn uniformly from the base
            idx = tf.random.stateless_uniform([u, n], x_seed, 0, tf.shape(self.base_x)[0],
                                              dtype=tf.int32)
            raw = tf.gather(self.base_x, idx)  # (U, N, d)
            label = tf.gather(perm, tf.gather(self.base_y, idx), batch_dims=1)  # (U, N)
        x = width_mask(tf.matmul(raw, proj), x_seed, self.cfg)  # (U, N, dx)
        return x, tf.one_hot(label, self.y_dim)

    def _some_classes(self, seed, u, n, perm):
        """Examples of c ~ U[min_classes, C] base classes per task (a random subset), each
        class equally likely; their labels are c distinct ids of perm: (U, N, d), (U, N)."""
        s = split(tf.random.experimental.stateless_fold_in(seed, 0xC1A5), 4)
        c_max = self.y_dim
        n_cls = tf.random.stateless_uniform([u, 1], s[0], self.cfg.classes_min, c_max + 1,
                                            dtype=tf.int32)
        chosen = tf.argsort(tf.random.stateless_uniform([u, c_max], s[1]), axis=-1)  # (U, C)
        pos = uniform_index(s[2], [u, n], n_cls)  # (U, N)
        base_cls = tf.gather(chosen, pos, batch_dims=1)  # (U, N): the base class of each point
        count = tf.gather(self.class_count, base_cls)
        offset = tf.cast(tf.random.stateless_uniform([u, n], s[3]) *
                         tf.cast(count, tf.float32), tf.int32)
        idx = tf.gather(self.class_start, base_cls) + tf.minimum(offset, count - 1)
        return tf.gather(self.sorted_x, idx), tf.gather(perm, pos, batch_dims=1)


def width_mask(x, seed, cfg):
    """x [U, N, D] with example i's features beyond its width d_i zeroed (d_i drawn as in
    TaskFamily.sample_x); x unchanged when the config has one width."""
    u, dim = x.shape[0], x.shape[-1]
    if cfg.x_dim_min >= dim:
        return x
    w_seed = tf.random.experimental.stateless_fold_in(seed, WIDTH_SEED)
    if cfg.x_dim_weights:  # d - min_x_dim ~ categorical(x_dim_weights)
        width = tf.reshape(draw_index(weight_logits(cfg.x_dim_weights), w_seed, u),
                           [u, 1, 1]) + cfg.x_dim_min
    else:
        width = tf.random.stateless_uniform([u, 1, 1], w_seed, cfg.x_dim_min, dim + 1,
                                            dtype=tf.int32)
    return x * tf.cast(tf.range(dim) < width, x.dtype)


@register_family("class_prior")
class ClassPrior(TaskFamily):
    """Synthetic classification tasks that need no data (issue 6/7).

    Each example draws c classes, c ~ U[task.min_classes, C] (C = task.y_dim), and
    one of two generators (probability 1/2 each):
      mlp: inputs x ~ U(x_low, x_high); the class is the arg-max of the first c
        outputs of a random MLP D -> 32 -> 32 -> C (tanh, weights N(0, 1)): curved,
        uneven decision regions;
      clusters: the class j ~ U{0..c-1}, x = mu_j + sigma * noise with centres
        mu_j ~ N(0, 1) per feature and sigma ~ U(0.3, 1.2): Gaussian classes that
        overlap more or less.
    Then a fraction rho ~ U(0, 0.1) of the labels is replaced by a random class
    (label noise), and the c classes get c distinct random ids in 0..C-1 (a
    random permutation), so a task's classes are any subset of the C outputs.
    Features beyond the example's width are zero (task.min_x_dim), as in regression.
    y is one-hot [U, N, C].
    """

    kind = "classification"
    supports_pool = False
    own_x = True
    hidden = 32

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.standardize_y:
            raise ValueError("task.standardize_y=True is invalid for classification: expected "
                             "false (y is one-hot)")
        if not 2 <= cfg.classes_min <= cfg.y_dim:
            raise ValueError(f"task.min_classes={cfg.min_classes} is invalid: expected 2 to "
                             f"task.y_dim={cfg.y_dim} (the number of classes C)")

    def sample_xy(self, x_seed, u, n, fn_seed=None, fn_seeds=None, x_low=None, x_high=None):
        cfg, dim, c_max = self.cfg, self.x_dim, self.y_dim
        s = split(fn_seed, 12)
        n_cls = tf.random.stateless_uniform([u, 1], s[0], cfg.classes_min, c_max + 1,
                                            dtype=tf.int32)  # (U, 1)
        absent = tf.range(c_max)[None, None, :] >= n_cls[:, :, None]  # (U, 1, C)
        # mlp: arg-max of a random MLP's first c outputs at uniform inputs
        x_u = self.sample_x(x_seed, u, n, x_low, x_high)
        h = x_u
        widths = [dim, self.hidden, self.hidden, c_max]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            w = tf.random.stateless_normal([u, a, b], s[1 + i], stddev=a**-0.5 * 2.0)
            bias = tf.random.stateless_normal([u, 1, b], s[4 + i], stddev=0.5)
            h = tf.matmul(h, w) + bias
            if i < 2:
                h = tf.tanh(h)
        h = tf.where(absent, tf.fill(tf.shape(h), -1e9), h)
        label_mlp = tf.argmax(h, axis=-1, output_type=tf.int32)  # (U, N)
        # clusters: a class per point, x around its class centre
        label_cl = uniform_index(s[7], [u, n], n_cls)
        centres = tf.random.stateless_normal([u, c_max, dim], s[8])
        sigma = tf.random.stateless_uniform([u, 1, 1], s[9], 0.3, 1.2)
        x_cl = tf.gather(centres, label_cl, batch_dims=1) + sigma * tf.random.stateless_normal(
            [u, n, dim], s[10])
        x_cl = width_mask(x_cl, x_seed, cfg)  # the same widths sample_x draws
        use_mlp = tf.random.stateless_uniform([u, 1], s[11]) < 0.5
        x = tf.where(use_mlp[..., None], x_u, x_cl)
        label = tf.where(use_mlp, label_mlp, label_cl)
        # label noise, then a random id for each class
        t = split(s[11], 4)
        rho = tf.random.stateless_uniform([u, 1], t[0], 0.0, 0.1)
        flip = tf.random.stateless_uniform([u, n], t[1]) < rho
        other = uniform_index(t[2], [u, n], n_cls)
        label = tf.where(flip, other, label)
        perm = tf.argsort(tf.random.stateless_uniform([u, c_max], t[3]), axis=-1)  # (U, C)
        ids = tf.gather(perm, label, batch_dims=1)
        return x, tf.one_hot(ids, c_max)


def gp_posterior(x_ctx, y_ctx, x_query, length_scale, noise_var):
    """Exact GP posterior predictive with the true unit-variance RBF kernel (the
    Bayes-optimal predictive distribution of gp_rbf tasks).

    Args:
      x_ctx: [Nc, dx] context inputs; y_ctx: [Nc, dy]; x_query: [Nq, dx].
      length_scale: the kernel's true length scale.
      noise_var: observation noise variance (plus the sampler's jitter).
    Returns:
      mean [Nq, dy] and variance [Nq, 1] of a noisy observation at each query
      (float64); the prior (0, 1 + noise_var) when Nc == 0.
    """
    x_ctx = tf.cast(x_ctx, tf.float64)
    x_query = tf.cast(x_query, tf.float64)
    y_ctx = tf.cast(y_ctx, tf.float64)
    nc = tf.shape(x_ctx)[0]
    k = rbf_kernel(x_ctx, x_ctx, length_scale) + noise_var * tf.eye(nc, dtype=tf.float64)
    ks = rbf_kernel(x_query, x_ctx, length_scale)  # (Nq, Nc)
    chol = tf.linalg.cholesky(k)
    mean = tf.matmul(ks, tf.linalg.cholesky_solve(chol, y_ctx))
    v = tf.linalg.triangular_solve(chol, tf.transpose(ks), lower=True)  # (Nc, Nq)
    var = 1.0 + noise_var - tf.reduce_sum(tf.square(v), 0)[:, None]
    return mean, tf.maximum(var, noise_var)


def gp_posterior_mean(x_ctx, y_ctx, x_query, length_scale, noise_var):
    """The mean of `gp_posterior` (the Bayes-optimal point prediction), float32 [Nq, dy]."""
    return tf.cast(gp_posterior(x_ctx, y_ctx, x_query, length_scale, noise_var)[0], tf.float32)


@register_family("prior")
class Prior(TaskFamily):
    """A broad prior over functions (issue 4/7): each example draws one component,
    with the probabilities of `task.prior_weights`, and its own observation noise.

    Components, all drawn in-graph and vectorised over the block:
      mlp: 1-4 hidden layers (layers beyond an example's depth are skipped), width
        4-32 (hidden units beyond it are masked), an activation per layer from
        tanh, relu, swish, sin, sigmoid (drawn once per block of examples), and a
        weight scale log-uniform in [0.5, 2];
      gp: an exact GP sample with an RBF or Matern-3/2 kernel and a length scale
        log-uniform in [0.1, 1] times sqrt(d), d the example's input width;
      linear: y = x w, w ~ N(0, I) (Garg et al.);
      sparse_linear: like linear with min(3, d) non-zero weights;
      tree: a decision tree of depth 4 (Garg et al.): each node splits a present
        feature at a threshold ~ U(-0.5, 0.5), leaves ~ N(0, 1);
      relu2: Garg et al.'s 2-layer ReLU network, sum_i a_i relu(w_i . x) over 100
        hidden units, w_i ~ N(0, I), a_i ~ N(0, 1).
    Noise: y is standardised per example, then with probability 1 -
    `task.prior_noise_free` Gaussian noise of std log-uniform in `task.prior_noise`
    is added (std 0 otherwise).
    """

    supports_pool = False
    components = ("mlp", "gp", "linear", "sparse_linear", "tree", "relu2")
    activations = ("tanh", "relu", "swish", "sin", "sigmoid")
    max_depth, max_width, tree_depth = 4, 32, 4

    def __init__(self, cfg):
        super().__init__(cfg)
        weights = dict(cfg.prior_weights)
        self.weights = [float(weights.get(c, 0.0)) for c in self.components]
        self.logits = weight_logits(self.weights)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        names = [c for c, _ in cfg.prior_weights]
        unknown = sorted(set(names) - set(cls.components))
        if unknown or not cfg.prior_weights or len(set(names)) != len(names):
            raise ValueError(f"task.prior_weights={cfg.prior_weights!r} is invalid: expected "
                             f"(component, weight) pairs, each component once, from "
                             f"{list(cls.components)}")
        if any(not w >= 0 for _, w in cfg.prior_weights) or not sum(
                w for _, w in cfg.prior_weights) > 0:
            raise ValueError(f"task.prior_weights={cfg.prior_weights!r} is invalid: expected "
                             "weights >= 0 with a positive sum")

    def pick(self, seed, u: int):
        """Component index of each of u examples: [U] (indices into `components`)."""
        return draw_index(self.logits, seed, u)

    def sample_y(self, seed, x):
        u = x.shape[0]
        s = split(seed, 8)
        present = present_features(x)  # (U, 1, D)
        d = tf.maximum(tf.reduce_sum(present, -1, keepdims=True), 1.0)  # (U, 1, 1)
        makers = [lambda: self._mlp(s[1], x, d), lambda: self._gp(s[2], x, d),
                  lambda: self._linear(s[3], x), lambda: self._sparse_linear(s[4], x, present),
                  lambda: self._tree(s[5], x, present), lambda: self._relu2(s[7], x)]
        y = pick_outputs(self.pick(s[0], u), self.weights, makers,
                         tf.stack([u, tf.shape(x)[1], self.y_dim]))  # (U, N, dy)
        mean, var = tf.nn.moments(y, axes=[1], keepdims=True)
        y = (y - mean) * tf.math.rsqrt(var + 1e-8)
        lo, hi = self.cfg.prior_noise
        k = split(s[6], 3)
        std = tf.exp(tf.random.stateless_uniform([u, 1, 1], k[0], math.log(lo), math.log(hi)))
        noisy = tf.random.stateless_uniform([u, 1, 1], k[1]) >= self.cfg.prior_noise_free
        std = tf.where(noisy, std, tf.zeros_like(std))
        return y + std * tf.random.stateless_normal(tf.shape(y), k[2])

    def _mlp(self, seed, x, d):
        u, dx, h_max = x.shape[0], self.x_dim, self.max_width
        s = split(seed, 4 * self.max_depth + 6)
        depth = tf.random.stateless_uniform([u, 1, 1], s[0], 1, self.max_depth + 1, tf.int32)
        width = tf.random.stateless_uniform([u, 1, 1], s[1], 4, h_max + 1, tf.int32)
        unit = tf.cast(tf.range(h_max) < width, tf.float32)  # (U, 1, H)
        scale = tf.exp(tf.random.stateless_uniform([u, 1, 1], s[2], math.log(0.5), math.log(2.0)))
        # One activation per layer for the whole block (each block is its own draw): a
        # switch runs one activation instead of all of them, ~3x cheaper per example.
        acts = tf.random.stateless_uniform([self.max_depth], s[3], 0, len(self.activations),
                                           tf.int32)
        h, fan_in = x, d
        for layer in range(self.max_depth):
            w = tf.random.stateless_normal([u, dx if layer == 0 else h_max, h_max],
                                           s[4 + 4 * layer]) * scale * tf.math.rsqrt(fan_in)
            b = tf.random.stateless_normal([u, 1, h_max], s[5 + 4 * layer]) * scale
            z = tf.matmul(h, w) + b
            z = tf.switch_case(acts[layer], [lambda a=a, z=z: _ACT[a](z)
                                             for a in self.activations]) * unit
            h = z if layer == 0 else tf.where(layer < depth, z, h)
            fan_in = tf.cast(width, tf.float32)
        w = tf.random.stateless_normal([u, h_max, self.y_dim], s[-1]) * tf.math.rsqrt(fan_in)
        return tf.matmul(h, w)

    def _gp(self, seed, x, d):
        u, n = x.shape[0], tf.shape(x)[1]
        s = split(seed, 3)
        ls = tf.exp(tf.random.stateless_uniform([u, 1, 1], s[0], math.log(0.1), 0.0))
        ls = tf.cast(ls * tf.sqrt(d), tf.float64)
        x64 = tf.cast(x, tf.float64)
        sq = tf.reduce_sum(tf.square(x64), -1)  # (U, N)
        d2 = tf.maximum(sq[:, :, None] + sq[:, None, :]
                        - 2.0 * tf.matmul(x64, x64, transpose_b=True), 0.0)  # (U, N, N)
        r = tf.sqrt(d2 + 1e-30) / ls
        rbf = tf.exp(-0.5 * tf.square(r))
        matern = (1.0 + math.sqrt(3.0) * r) * tf.exp(-math.sqrt(3.0) * r)
        use_rbf = tf.random.stateless_uniform([u, 1, 1], s[1]) < 0.5
        k = tf.where(use_rbf, rbf, matern) + 1e-5 * tf.eye(n, dtype=tf.float64)
        z = tf.random.stateless_normal([u, n, self.y_dim], s[2], dtype=tf.float64)
        return tf.cast(tf.matmul(tf.linalg.cholesky(k), z), tf.float32)

    def _linear(self, seed, x):
        w = tf.random.stateless_normal([x.shape[0], self.x_dim, self.y_dim], seed)
        return tf.matmul(x, w)

    def _sparse_linear(self, seed, x, present):
        """y = x w with w non-zero on min(3, d) of the example's present features."""
        s = split(seed, 2)
        u = x.shape[0]
        keys = tf.random.stateless_uniform([u, self.x_dim], s[0]) + present[:, 0]  # present > 1
        rank = tf.argsort(tf.argsort(-keys, axis=-1), axis=-1)  # 0 = largest key
        keep = tf.cast(rank < 3, tf.float32) * present[:, 0]  # (U, D)
        w = tf.random.stateless_normal([u, self.x_dim, self.y_dim], s[1]) * keep[..., None]
        return tf.matmul(x, w)

    def _relu2(self, seed, x, hidden: int = 100):
        s = split(seed, 2)
        w = tf.random.stateless_normal([x.shape[0], self.x_dim, hidden], s[0])
        a = tf.random.stateless_normal([x.shape[0], hidden, self.y_dim], s[1])
        return tf.matmul(tf.nn.relu(tf.matmul(x, w)), a)

    def _tree(self, seed, x, present):
        """A depth-4 decision tree per example, splitting present features only."""
        u, n_inner = x.shape[0], 2**self.tree_depth - 1
        s = split(seed, 3)
        logits = tf.math.log(tf.maximum(present[:, 0], 1e-30))  # (U, D): present features only
        feat = tf.random.stateless_categorical(logits, n_inner, s[0], dtype=tf.int32)  # (U, I)
        thr = tf.random.stateless_uniform([u, n_inner], s[1], -0.5, 0.5)
        leaves = tf.random.stateless_normal([u, n_inner + 1, self.y_dim], s[2])
        node = tf.zeros(tf.shape(x)[:2], tf.int32)  # (U, N)
        for _ in range(self.tree_depth):
            f = tf.gather(feat, node, batch_dims=1)  # (U, N)
            v = tf.gather(x, f, batch_dims=2)  # (U, N)
            right = tf.cast(v > tf.gather(thr, node, batch_dims=1), tf.int32)
            node = 2 * node + 1 + right
        return tf.gather(leaves, node - n_inner, batch_dims=1)  # (U, N, dy)
