"""What a TF Serving operator expects beside a SavedModel: warmup requests, a model
config file naming every model, and batching parameters.

    exports/
        models.config            ModelServerConfig: one entry per model folder
        batching.config          BatchingParameters (an example; never overwritten)
        <model>/<version>/assets.extra/tf_serving_warmup_requests

Every export writes its warmup file (a TFRecord of PredictionLog records made with
tensorflow-serving-api's own messages) and adds its model to models.config; with

    docker run -p 8500:8500 -p 8501:8501 -v "$PWD/exports:/models" tensorflow/serving \\
        --model_config_file=/models/models.config --enable_batching \\
        --batching_parameters_file=/models/batching.config --enable_model_warmup

TF Serving loads every model, replays the warmup requests before it marks a version
AVAILABLE (the first live request is then as fast as the others: TF Serving issue
#385), and batches concurrent requests.

Batching joins requests along the batch dimension only when every other dimension
agrees (the same number of context points, queries and features); a batch of
requests of different shapes fails. Padding (`pad_variable_length_inputs`) is off
and must stay off: padded rows would be read as extra context points. Enable
batching for clients that send requests of one shape, such as the estimator, which
sends its queries in chunks of `batch_size` against one context.
"""

from __future__ import annotations

import os

import numpy as np

from gpicl_tf.files import write_atomic

WARMUP_FILE = "tf_serving_warmup_requests"  # under assets.extra/, as TF Serving expects
MODELS_CONFIG = "models.config"
BATCHING_CONFIG = "batching.config"
SERVING_ROOT = "/models"  # where exports/ is mounted in the TF Serving container

BATCHING_TEXT = """\
# TF Serving batching parameters (--enable_batching --batching_parameters_file=...).
# Requests are batched only with requests of the same shape (context points, queries,
# features); padding stays off: padded rows would be read as extra context points.
max_batch_size { value: 64 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: 2 }
pad_variable_length_inputs: false
"""


def warmup_shapes(cfg) -> list:
    """(signature, width, context points, queries) of the warmup requests: the narrowest
    and widest inputs, a short, a middling and a full context, one query and a chunk of
    queries; the bar head's `quantiles` and `log_prob` signatures once each."""
    t = cfg.task
    widths = sorted({t.x_dim_min, t.x_dim})
    contexts = sorted({min(8, t.context_max), min(32, t.context_max), t.context_max})
    shapes = [("serving_default", w, nc, nq) for w in widths for nc in contexts
              for nq in (1, 16)]
    if t.kind != "classification" and cfg.model.head == "bar":
        shapes += [(sig, t.x_dim, contexts[-1], 16) for sig in ("quantiles", "log_prob")]
    return shapes


def warmup_requests(cfg, model_name: str, seed: int = 0) -> list:
    """PredictRequest messages covering `warmup_shapes`, with seeded inputs."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    rng = np.random.default_rng(seed)
    t = cfg.task
    requests = []
    for sig, width, nc, nq in warmup_shapes(cfg):
        inputs = {"context_x": rng.uniform(-1, 1, (1, nc, width)).astype(np.float32),
                  "query_x": rng.uniform(-1, 1, (1, nq, width)).astype(np.float32)}
        if t.kind == "classification":
            inputs["context_y"] = rng.integers(0, min(2, t.y_dim), (1, nc)).astype(np.int64)
        else:
            inputs["context_y"] = rng.normal(size=(1, nc, t.y_dim)).astype(np.float32)
        if sig == "quantiles":
            inputs["levels"] = np.asarray([0.1, 0.5, 0.9], np.float32)
        if sig == "log_prob":
            inputs["query_y"] = rng.normal(size=(1, nq, t.y_dim)).astype(np.float32)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = sig
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        requests.append(request)
    request = predict_pb2.PredictRequest()  # the config, as TFServingClient asks for it
    request.model_spec.name, request.model_spec.signature_name = model_name, "model_config"
    request.inputs["unused"].CopyFrom(tf.make_tensor_proto(np.zeros([1], np.float32)))
    return requests + [request]


def write_warmup(version_dir: str, cfg, model_name: str) -> str:
    """Writes assets.extra/tf_serving_warmup_requests (PredictionLog records); its path."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(version_dir, "assets.extra", WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for request in warmup_requests(cfg, model_name):
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def read_warmup(version_dir: str) -> list:
    """The PredictionLog records of a version's warmup file."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(version_dir, "assets.extra", WARMUP_FILE)
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(path)]


def read_models_config(export_dir: str):
    """exports/models.config as a ModelServerConfig (empty if there is none); a file that
    does not parse is a ValueError naming it."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    path = os.path.join(export_dir, MODELS_CONFIG)
    if os.path.exists(path):
        try:
            with open(path) as f:
                text_format.Parse(f.read(), config)
        except (OSError, text_format.ParseError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: expected a TF Serving model config (a ModelServerConfig "
                             f"in protobuf text format with model_config_list), could not "
                             f"read it: {e}") from None
    return config


def model_folders(export_dir: str) -> list:
    """Names of the model base folders under export_dir (those with integer versions)."""
    def has_versions(base):
        return os.path.isdir(base) and any(
            v.isdigit() and os.path.isdir(os.path.join(base, v)) for v in os.listdir(base))

    if not os.path.isdir(export_dir):
        return []
    return sorted(d for d in os.listdir(export_dir)
                  if not d.startswith(".") and has_versions(os.path.join(export_dir, d)))


def update_serving_configs(export_dir: str, serving_root: str = SERVING_ROOT) -> str:
    """Adds every model folder under export_dir to export_dir/models.config (entries
    already there, and their settings, are kept) and writes an example batching.config
    if there is none. Both are written atomically. Returns models.config's path.

    serving_root: the path at which the server sees export_dir (the README's docker
    command mounts it at /models); each new entry's base_path is serving_root/<name>.
    """
    from google.protobuf import text_format

    config = read_models_config(export_dir)
    entries = config.model_config_list.config
    named = {c.name for c in entries}
    for name in model_folders(export_dir):
        if name not in named:
            entry = entries.add()
            entry.name = name
            entry.base_path = f"{serving_root.rstrip('/')}/{name}"
            entry.model_platform = "tensorflow"
    path = os.path.join(export_dir, MODELS_CONFIG)
    write_atomic(path, text_format.MessageToString(config))
    batching = os.path.join(export_dir, BATCHING_CONFIG)
    if not os.path.exists(batching):
        write_atomic(batching, BATCHING_TEXT)
    return path
