"""SavedModel export in TF Serving's layout, written atomically.

    exports/<model_name>/<version>/          integer versions that increase
        saved_model.pb, variables/
        assets.extra/gpicl_config.json       the resolved experiment config
        assets.extra/tf_serving_warmup_requests  TF Serving's warmup (gpicl_tf.tfserving)
    exports/models.config, exports/batching.config

A version is written to a hidden temporary directory beside the others and
renamed into place, so TF Serving, which polls the folder for integer
subdirectories, never sees a half-written version.

Signatures:
  serving_default: context_x [B, Nc, d], context_y [B, Nc, dy],
    query_x [B, Nq, d] (raw scale; B, Nc, Nq dynamic) -> mean [B, Nq, dy].
  masked: x [B, N, d], y [B, N, dy], is_query [B, N] (0/1) -> y_pred [B, N, dy].
  The input width d may be any width the model was trained on (task.min_x_dim
  to task.x_dim = D); the graph pads it with zero features to D.
  model_config: unused [any] -> config_json (the resolved config as a JSON
    string), so a TF Serving client learns the widths and context limit.
A model with the bar head (model.head="bar") predicts a distribution; its
serving_default also returns std [B, Nq, dy] and quantiles [B, Nq, dy, L] at the
L levels fixed at export (default 0.05, 0.25, 0.5, 0.75, 0.95; model_config
returns them as quantile_levels), and two more signatures answer:
  quantiles: context_x, context_y, query_x, levels [L] (each in (0, 1))
    -> quantiles [B, Nq, dy, L] at the requested levels;
  log_prob: context_x, context_y, query_x, query_y [B, Nq, dy]
    -> log_prob (log density of query_y) and cdf (P(Y <= query_y)), [B, Nq, dy].
Every value is on the raw scale of y.
A classification model's serving_default takes class ids instead:
  context_x [B, Nc, d], context_y [B, Nc] int64 ids in [0, C), query_x [B, Nq, d]
    -> probabilities [B, Nq, C], classes absent from the context at 0;
its masked signature takes y one-hot [B, N, C] and returns the logits.
Both check their inputs in the graph (width, batch and length agreement,
finite values of magnitude at most 1e36, 0/1 query flags), so a bad request
fails with a message naming the input.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import uuid
from typing import Optional

import keras
import tensorflow as tf

from gpicl_tf import lean, tfserving
from gpicl_tf.config import MAX_ABS_VALUE, ExperimentConfig, check_name, read_config
from gpicl_tf.distributions import check_levels
from gpicl_tf.model import (Predictive, bar_distribution, masked_inputs, point_prediction,
                            query_rows)

DEFAULT_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)  # serving_default's quantiles (bar head)

CONFIG_ASSET = "gpicl_config.json"
PROVENANCE_ASSET = "gpicl_export.json"
_TMP = re.compile(r"^\.tmp-\d+-(\d+)-[0-9a-f]+$")  # .tmp-<version>-<pid>-<random>


def _require(condition, message: str):
    """Fails the request with `message` unless every element of condition holds. Its only
    data is the message, so TensorFlow adds the Assert op alone (the tf.debugging.assert_*
    helpers, which also print the tensors, wrap each in a conditional: more ops on every
    request)."""
    return tf.debugging.Assert(tf.reduce_all(condition), [message])


def _value_checks(name: str, t):
    """Finite values of representable magnitude (see config.MAX_ABS_VALUE)."""
    return [tf.debugging.assert_all_finite(t, f"{name}: expected finite values"),
            _require(tf.reduce_max(tf.abs(t)) <= tf.constant(MAX_ABS_VALUE, t.dtype),
                     f"{name}: expected values of magnitude at most {MAX_ABS_VALUE:g} "
                     "(float32 arithmetic); rescale the data")]


def _width_checks(name: str, t, dx: int, dx_min: int):
    """The input width of t lies in [dx_min, dx] (the widths the model was trained on)."""
    w = tf.shape(t)[-1]
    msg = f"{name}: expected last dimension (input width) {dx}"
    if dx_min < dx:
        msg = (f"{name}: expected last dimension (input width) in [{dx_min}, {dx}] (the "
               f"model reads at most {dx} input features)")
    return [_require((w <= dx) & (w >= dx_min), msg)]


def pad_width(t, dx: int):
    """Pads the last dimension of t [B, N, d] with zeros to dx: absent features, as in training."""
    return tf.pad(t, [[0, 0], [0, 0], [0, dx - tf.shape(t)[-1]]])


def class_probabilities(logits, context_onehot):
    """Softmax of logits [B, Nq, C] over the classes present in the context (one-hot
    [B, Nc, C]); absent classes get probability 0. With no context point every class
    stays possible."""
    present = tf.reduce_max(context_onehot, axis=1, keepdims=True) > 0  # (B, 1, C)
    present |= ~tf.reduce_any(present, axis=-1, keepdims=True)
    masked = tf.where(present, tf.cast(logits, tf.float32), tf.fill(tf.shape(logits), -1e30))
    return tf.nn.softmax(masked, axis=-1)


def _check_inputs(dx: int, dy: int, dx_min: int, context_x, context_y, query_x):
    """Graph-side validation; raises InvalidArgumentError with a clear message."""
    checks = [
        *_width_checks("context_x", context_x, dx, dx_min),
        *_width_checks("query_x", query_x, dx, dx_min),
        _require(tf.equal(tf.shape(query_x)[-1], tf.shape(context_x)[-1]), (
            "query_x: expected the input width of context_x")),
        _require(tf.equal(tf.shape(context_y)[-1], dy), (
            f"context_y: expected last dimension (output width) {dy}")),
        _require(tf.equal(tf.shape(context_x)[:2], tf.shape(context_y)[:2]), (
            "context_x and context_y: expected the same batch size and number of "
            "context points")),
        _require(tf.equal(tf.shape(context_x)[0], tf.shape(query_x)[0]), (
            "context_x and query_x: expected the same batch size")),
    ]
    for name, t in (("context_x", context_x), ("context_y", context_y), ("query_x", query_x)):
        checks += _value_checks(name, t)
    return checks


def build_archive(model: keras.Model, cfg: ExperimentConfig, jit_compile: bool = False,
                  quantile_levels=DEFAULT_LEVELS) -> keras.export.ExportArchive:
    """An ExportArchive with the `serving_default` and `masked` signatures (and, for the
    bar head, `quantiles` and `log_prob`).

    With jit_compile the model part of each signature is XLA-compiled (about
    2.2x lower CPU latency per request: p50 1.6 ms against 3.6 ms); TF Serving on CPU then needs
    `--xla_cpu_compilation_enabled=true`. Input checks stay outside XLA.
    quantile_levels: the levels of serving_default's quantiles (bar head only).
    """
    dx, dy, dx_min = cfg.task.x_dim, cfg.task.y_dim, cfg.task.x_dim_min
    bars = bar_distribution(model)
    levels = tf.constant(check_levels(quantile_levels))
    archive = keras.export.ExportArchive()
    archive.track(model)

    if lean.supported(model):  # the same function in fewer graph ops (gpicl_tf.lean)
        forward = lean.lean_forward(model)
    else:
        def forward(x, y, is_query):
            return model({"x": x, "y": y, "is_query": is_query}, training=False)

    @tf.function(jit_compile=jit_compile, autograph=False)
    def run(x, y, is_query):
        return forward(x, y, is_query)

    def checked_inputs(context_x, context_y, query_x):
        """The model's inputs (context, then queries), made only after the input checks."""
        with tf.control_dependencies(_check_inputs(dx, dy, dx_min, context_x, context_y,
                                                   query_x)):
            inputs = masked_inputs(pad_width(context_x, dx), context_y, pad_width(query_x, dx))
        return inputs["x"], inputs["y"], inputs["is_query"]

    def run_queries(context_x, context_y, query_x):
        """The model's output at the queries (a tensor, or the bar head's dict)."""
        out = run(*checked_inputs(context_x, context_y, query_x))
        nc = tf.shape(context_x)[1]
        if bars is None:
            return tf.cast(out[:, nc:, :], tf.float32)
        return query_rows(out, nc)

    def classify(context_x, context_y, query_x):
        """Class ids [B, Nc] in context_y -> probabilities [B, Nq, C], classes absent from
        the context at 0 (a context without points leaves every class possible)."""
        checks = [
            _require((context_y >= 0) & (context_y < dy), (
                f"context_y: expected class ids in [0, {dy}) (the model knows {dy} classes)")),
            _require(tf.equal(tf.shape(context_y), tf.shape(context_x)[:2]), (
                "context_y: expected class ids of shape [batch, context points] matching "
                "context_x"))]
        with tf.control_dependencies(checks):
            onehot = tf.one_hot(context_y, dy)
        logits = run_queries(context_x, onehot, query_x)  # (B, Nq, C)
        return {"probabilities": class_probabilities(logits, onehot)}

    @tf.function(jit_compile=jit_compile, autograph=False)
    def run_summary(x, y, is_query):
        """The bar head's mean, std and quantiles at `levels` at every point, in one XLA
        function with the model (--xla: 1.7 ms a request against 2.4 ms with the
        statistics outside XLA; XLA cannot slice the queries out first, their number
        being dynamic)."""
        dist = Predictive(bars, run.python_function(x, y, is_query))
        return dist.mean(), dist.std(), dist.quantiles(levels)

    def serve(context_x, context_y, query_x):
        if bars is None:
            return {"mean": run_queries(context_x, context_y, query_x)}
        if not jit_compile:  # the statistics of the queries only (cheaper without XLA)
            out = run_queries(context_x, context_y, query_x)
            dist = Predictive(bars, out)
            return {"mean": out["y_pred"], "std": dist.std(), "quantiles": dist.quantiles(levels)}
        mean, std, qs = run_summary(*checked_inputs(context_x, context_y, query_x))
        nc = tf.shape(context_x)[1]
        return {"mean": mean[:, nc:], "std": std[:, nc:], "quantiles": qs[:, nc:]}

    def quantiles(context_x, context_y, query_x, levels):
        check = _require((levels > 0.0) & (levels < 1.0),
                         "levels: expected quantile levels strictly between 0 and 1")
        with tf.control_dependencies([check]):
            levels = tf.identity(levels)
        dist = Predictive(bars, run_queries(context_x, context_y, query_x))
        return {"quantiles": dist.quantiles(levels)}

    def log_prob(context_x, context_y, query_x, query_y):
        checks = [_require(tf.equal(tf.shape(query_y), tf.concat(
            [tf.shape(query_x)[:2], [dy]], 0)), (
                f"query_y: expected shape [batch, queries, {dy}] matching query_x")),
            *_value_checks("query_y", query_y)]
        with tf.control_dependencies(checks):
            query_y = tf.identity(query_y)
        dist = Predictive(bars, run_queries(context_x, context_y, query_x))
        return {"log_prob": dist.log_prob(query_y), "cdf": dist.cdf(query_y)}

    def masked(x, y, is_query):
        checks = [
            *_width_checks("x", x, dx, dx_min),
            _require(tf.equal(tf.shape(y)[-1], dy), f"y: expected width {dy}"),
            _require(tf.equal(tf.shape(x)[:2], tf.shape(is_query)), (
                "x and is_query: expected the same [batch, points]")),
            _require(tf.equal(tf.shape(x)[:2], tf.shape(y)[:2]), (
                "x and y: expected the same [batch, points]")),
            _require((is_query == 0.0) | (is_query == 1.0), (
                    "is_query: expected only 0 (context) and 1 (query) values")),
            *_value_checks("x", x), *_value_checks("y", y),
        ]
        with tf.control_dependencies(checks):  # no model op runs before the checks
            x, y, is_query = pad_width(x, dx), tf.identity(y), tf.identity(is_query)
        return {"y_pred": tf.cast(point_prediction(run(x, y, is_query)), tf.float32)}

    config_json = tf.constant(cfg.to_json())

    def model_config(unused):
        del unused  # TF Serving needs an input; the answer is a constant
        if bars is None:
            return {"config_json": config_json}
        return {"config_json": config_json, "quantile_levels": levels}

    f32 = tf.float32
    if cfg.task.kind == "classification":
        archive.add_endpoint("serving_default", classify, input_signature=[
            tf.TensorSpec([None, None, None], f32, name="context_x"),
            tf.TensorSpec([None, None], tf.int64, name="context_y"),
            tf.TensorSpec([None, None, None], f32, name="query_x")])
    else:
        archive.add_endpoint("serving_default", serve, input_signature=[
            tf.TensorSpec([None, None, None], f32, name="context_x"),
            tf.TensorSpec([None, None, dy], f32, name="context_y"),
            tf.TensorSpec([None, None, None], f32, name="query_x")])
    archive.add_endpoint("masked", masked, input_signature=[
        tf.TensorSpec([None, None, None], f32, name="x"),
        tf.TensorSpec([None, None, dy], f32, name="y"),
        tf.TensorSpec([None, None], f32, name="is_query")])
    archive.add_endpoint("model_config", model_config, input_signature=[
        tf.TensorSpec([None], f32, name="unused")])
    if bars is not None:
        queries = [tf.TensorSpec([None, None, None], f32, name="context_x"),
                   tf.TensorSpec([None, None, dy], f32, name="context_y"),
                   tf.TensorSpec([None, None, None], f32, name="query_x")]
        archive.add_endpoint("quantiles", quantiles, input_signature=[
            *queries, tf.TensorSpec([None], f32, name="levels")])
        archive.add_endpoint("log_prob", log_prob, input_signature=[
            *queries, tf.TensorSpec([None, None, dy], f32, name="query_y")])
    return archive


def versions(base: str) -> list:
    """Integer version directories under base, sorted."""
    if not os.path.isdir(base):
        return []
    return sorted(int(d) for d in os.listdir(base)
                  if d.isdigit() and os.path.isdir(os.path.join(base, d)))


def export_model(model: keras.Model, cfg: ExperimentConfig, export_dir: str = "exports",
                 model_name: Optional[str] = None, version: Optional[int] = None,
                 jit_compile: bool = False, attempts: int = 20,
                 provenance: Optional[dict] = None, quantile_levels=DEFAULT_LEVELS,
                 serving_root: str = tfserving.SERVING_ROOT) -> str:
    """Writes a new version of the SavedModel atomically; returns its path.

    With it, TF Serving's warmup requests (assets.extra/tf_serving_warmup_requests)
    and, after the rename, export_dir/models.config naming the model (base path
    serving_root/<name>) and an example batching.config (gpicl_tf.tfserving).

    The version is written to a hidden `.tmp-<version>-<pid>-<random>` folder
    and renamed into place. If another exporter took the version meanwhile,
    the rename fails and the next free version is tried. Temporary folders
    left by exporters that died (their pid is gone) are removed.

    Args:
      model: the trained Keras model.
      cfg: its experiment config (written to assets.extra/).
      export_dir: the model base folder's parent.
      model_name: folder name under export_dir (default cfg.name); letters,
        digits, '-' and '_' only, so it stays inside export_dir.
      version: explicit version (never overwritten); default the highest
        existing + 1.
      jit_compile: XLA-compile the signatures (see build_archive).
      attempts: versions tried before giving up when exporters race.
      provenance: written as assets.extra/gpicl_export.json (run folder and
        step the weights come from), so an unchanged model is not exported again.
      quantile_levels: levels of serving_default's quantiles (bar head), each in (0, 1).
      serving_root: where the server sees export_dir (the docker command's mount).
    """
    check_levels(quantile_levels)  # before any folder is made
    name = check_name(model_name or cfg.name, "--model-name")

    def fill(tmp):
        build_archive(model, cfg, jit_compile, quantile_levels).write_out(tmp, verbose=False)
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp, "assets.extra", CONFIG_ASSET), "w") as f:
            f.write(cfg.to_json())
        if provenance is not None:
            with open(os.path.join(tmp, "assets.extra", PROVENANCE_ASSET), "w") as f:
                json.dump(provenance, f, indent=1)
        tfserving.write_warmup(tmp, cfg, name)

    return write_version(export_dir, name, fill, version, attempts, serving_root)


def write_version(export_dir: str, name: str, fill, version: Optional[int] = None,
                  attempts: int = 20, serving_root: str = tfserving.SERVING_ROOT) -> str:
    """Writes one version of export_dir/<name> atomically; returns its path.

    fill(tmp) writes the version into a hidden `.tmp-<version>-<pid>-<random>` folder
    beside the others (it creates tmp), which `publish` then renames into place;
    export_dir/models.config then names the model. A models.config it could not update,
    or an explicit version that exists, is refused before anything is written; the
    hidden folder is removed whatever happens.
    """
    tfserving.read_models_config(export_dir)
    base = os.path.join(export_dir, name)
    if version is not None and os.path.exists(os.path.join(base, str(version))):
        raise FileExistsError(f"export version {os.path.join(base, str(version))} exists; "
                              "versions are never overwritten")
    os.makedirs(base, exist_ok=True)
    clean_stale_tmp(base)
    tmp = os.path.join(base, f".tmp-{version or 0}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fill(tmp)
        final = publish(tmp, base, version, attempts)
        tfserving.update_serving_configs(export_dir, serving_root)
        return final
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: str, base: str, version: Optional[int] = None, attempts: int = 20) -> str:
    """Renames a finished version folder `tmp` (inside base) to its integer version:
    `version`, or the highest existing + 1, retried when another exporter takes it."""
    for _ in range(attempts):
        v = version if version is not None else (versions(base) or [0])[-1] + 1
        final = os.path.join(base, str(v))
        try:
            os.rename(tmp, final)  # atomic on one filesystem; fails if final is taken
            return final
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if version is not None:  # taken meanwhile by another exporter
                raise FileExistsError(f"export version {final} exists; versions are "
                                      "never overwritten") from None
    raise RuntimeError(f"{base}: no free version after {attempts} attempts (other "
                       "exporters kept taking them)")


def clean_stale_tmp(base: str) -> list:
    """Removes `.tmp-*` folders under base whose exporter process is gone; returns them."""
    removed = []
    for d in os.listdir(base):
        m = _TMP.match(d)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(base, d), ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def provenance(run_dir: str, step: int, cfg: ExperimentConfig) -> dict:
    """Where an export's weights come from: run folder, step and config."""
    return {"run_dir": os.path.abspath(run_dir), "step": int(step), "config": cfg.to_dict()}


def export_if_changed(model: keras.Model, cfg: ExperimentConfig, export_dir: str, step: int,
                      run_dir: str) -> str:
    """Exports unless the newest version already holds these weights; returns its path.

    The newest version's provenance (run folder, step, config) is compared
    with this model's: a rerun of a finished run does not add an identical
    version for TF Serving to load.
    """
    base = os.path.join(export_dir, check_name(cfg.name, "--model-name"))
    prov = provenance(run_dir, step, cfg)
    vs = versions(base)
    if vs:
        latest = os.path.join(base, str(vs[-1]))
        try:
            with open(os.path.join(latest, "assets.extra", PROVENANCE_ASSET)) as f:
                if json.load(f) == json.loads(json.dumps(prov)):
                    return latest
        except (OSError, ValueError):
            pass
    return export_model(model, cfg, export_dir, provenance=prov)


def load_config(version_dir: str) -> ExperimentConfig:
    """The experiment config stored in an exported version (ValueError naming the file)."""
    return read_config(os.path.join(version_dir, "assets.extra", CONFIG_ASSET),
                       "expected the config that gpicl_tf's export writes there")


def load_signatures(version_dir: str, required=("serving_default",)):
    """Every signature of an exported version, loaded once; an unreadable SavedModel, or
    one without a `required` signature, is a ValueError."""
    try:
        signatures = tf.saved_model.load(version_dir).signatures
        for name in required:
            signatures[name]  # noqa: B018  KeyError names the missing one
        return signatures
    except Exception as e:  # noqa: BLE001  protobuf DecodeError, OpError, KeyError, ...
        msg = (getattr(e, "message", None) or str(e)).strip().splitlines()
        want = ", ".join(repr(n) for n in required)
        raise ValueError(f"{version_dir}: expected a SavedModel with signature {want}, "
                         f"could not load it: {msg[0][:200] if msg else type(e).__name__}"
                         ) from None


def load_signature(version_dir: str, name: str = "serving_default"):
    """A signature of an exported version; an unreadable SavedModel is a ValueError."""
    return load_signatures(version_dir, (name,))[name]


def resolve_version(model_dir: str, version: Optional[int] = None,
                    cli: bool = True) -> str:
    """Path of `version` (default: the highest) under an export base folder; a version
    folder itself (one holding saved_model.pb, e.g. a shipped model) is returned as it is
    when no version is asked for. Errors name the flags (--model, --version), or with
    cli=False the estimators' parameters (model=, version=)."""
    mod = f"--model {model_dir!r}" if cli else f"model={model_dir!r}"
    ver = f"--version {version}" if cli else f"version={version}"
    if os.path.exists(os.path.join(model_dir, "saved_model.pb")):
        if version is not None:
            raise ValueError(f"{ver}: {model_dir!r} is a version folder already; expected "
                             f"no {'--version' if cli else 'version'}, or its base folder")
        return model_dir
    vs = versions(model_dir)
    if not vs:
        raise ValueError(f"{mod}: expected a folder with integer version subfolders "
                         "(exports/<model_name>) or one version folder, found neither")
    if version is None:
        return os.path.join(model_dir, str(vs[-1]))
    if version not in vs:
        raise ValueError(f"{ver} does not exist under {model_dir!r}: expected one of {vs}")
    return os.path.join(model_dir, str(version))


def export_checkpoint(logdir: str, export_dir: str = "exports",
                      model_name: Optional[str] = None, jit_compile: bool = False,
                      serving_root: str = tfserving.SERVING_ROOT,
                      recalibrate: bool = False, recalibrate_width: bool = False) -> str:
    """Exports the latest checkpoint of a run directory without training.

    recalibrate: (a bar-head run) fit the head's recalibration maps
    (`model.recalibrate`, `gpicl_tf.train.fit_recalibration`) on the run's weights and
    export the model with them; the run folder is left as it is. recalibrate_width: those
    maps per context size and input-width group (`model.recalibrate_width`).
    """
    from gpicl_tf.model import build_model
    from gpicl_tf.train import Trainer, fit_recalibration

    path = os.path.join(logdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"--logdir {logdir!r}: expected a run directory with config.json "
                         "and checkpoints/ (written by train_keras.py)")
    cfg = read_config(path)
    if recalibrate_width and not recalibrate:
        raise ValueError("--recalibrate-width: the maps per input width are a kind of "
                         "recalibration; add --recalibrate")
    if recalibrate and cfg.model.head != "bar":
        raise ValueError(f"--recalibrate: the run in {logdir!r} has model.head="
                         f"{cfg.model.head!r}; recalibration is for a bar head (model.head=bar)")
    trainer = Trainer(cfg, logdir, strategy=tf.distribute.get_strategy())
    if trainer.manager.latest_checkpoint is None:
        raise ValueError(f"--logdir {logdir!r}: no checkpoint under {trainer.ckpt_dir}")
    step = trainer.restore()
    model = trainer.model
    if recalibrate:
        if not cfg.model.recalibrate or cfg.model.recalibrate_width != recalibrate_width:
            # the same weights in a model that has the maps asked for
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, recalibrate=True, recalibrate_width=recalibrate_width))
            model = build_model(cfg)
            weights = {w.path: w for w in model.weights}  # the run's, and maps to fit
            for w in trainer.model.weights:
                if w.path != "bar/recalibration":
                    weights[w.path].assign(w)
        fit_recalibration(model, cfg)
    out = export_model(model, cfg, export_dir, model_name, jit_compile=jit_compile,
                       provenance=provenance(logdir, step, cfg), serving_root=serving_root)
    print(f"exported step {step} of {logdir} to {out}"
          + (" (recalibrated)" if recalibrate else ""))
    return out


def main(argv=None) -> int:
    """gpicl-export (see gpicl_tf.cli)."""
    from gpicl_tf.cli import export_main

    return export_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
