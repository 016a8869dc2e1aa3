"""TF Serving's conventions (issue 7/7): warmup requests in every export, models.config
naming every exported model, an example batching.config."""

import os

import numpy as np
import pytest

from fake_serving import FakeGrpcServing
from gpicl_tf import tfserving


def _replay_all(version_dir, name):
    """Every warmup record's request, sent as it is through the Predict RPC to an
    in-process PredictionService over the export; the replies."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    import grpc

    logs = tfserving.read_warmup(version_dir)
    replies = []
    with FakeGrpcServing(name, versions={1: version_dir}) as srv, \
            grpc.insecure_channel(srv.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for log in logs:
            assert log.WhichOneof("log_type") == "predict_log"
            replies.append((log.predict_log.request, stub.Predict(log.predict_log.request,
                                                                   timeout=60)))
    return replies


def _shape(tensor_proto):
    return [d.size for d in tensor_proto.tensor_shape.dim]


def test_warmup_records_parse_and_every_request_replays(tiny_export_d8):
    import tensorflow as tf

    from gpicl_tf.export import load_config

    vdir = f"{tiny_export_d8}/1"
    cfg = load_config(vdir)
    replies = _replay_all(vdir, "gpicl")
    shapes = set()
    for request, reply in replies:
        sig = request.model_spec.signature_name
        assert request.model_spec.name == "gpicl"
        if sig == "model_config":
            assert b"x_dim" in tf.make_ndarray(reply.outputs["config_json"]).item()
            continue
        mean = tf.make_ndarray(reply.outputs["mean"])
        qx = _shape(request.inputs["query_x"])
        assert mean.shape == (1, qx[1], 1) and np.isfinite(mean).all()
        shapes.add((qx[2], _shape(request.inputs["context_x"])[1], qx[1]))
    # the narrowest and widest inputs, short and full contexts, one query and a chunk
    widths = {w for w, _, _ in shapes}
    contexts = {nc for _, nc, _ in shapes}
    assert widths == {1, 8} and {8, cfg.task.context_max} <= contexts
    assert {nq for _, _, nq in shapes} == {1, 16}
    assert len(replies) == len(tfserving.warmup_shapes(cfg)) + 1


def test_bar_and_classifier_warmups_cover_their_signatures(tmp_path_factory):
    import tensorflow as tf

    from test_bar_head import _bar_model
    from test_classifier import _classifier

    from gpicl_tf.export import export_model

    model, cfg = _bar_model()
    bar = export_model(model, cfg, str(tmp_path_factory.mktemp("wbar")), "bar")
    sigs = {}
    for request, reply in _replay_all(bar, "bar"):
        sigs.setdefault(request.model_spec.signature_name, []).append(reply)
    assert set(sigs) == {"serving_default", "quantiles", "log_prob", "model_config"}
    q = tf.make_ndarray(sigs["quantiles"][0].outputs["quantiles"])
    assert q.shape[-1] == 3 and (np.diff(q, axis=-1) >= 0).all()
    assert np.isfinite(tf.make_ndarray(sigs["log_prob"][0].outputs["log_prob"])).all()

    _, ccfg, cls = _classifier(tmp_path_factory, name="wcls")
    for request, reply in _replay_all(cls, "gpicl-classify"):
        if request.model_spec.signature_name == "serving_default":
            assert request.inputs["context_y"].dtype == tf.int64.as_datatype_enum
            p = tf.make_ndarray(reply.outputs["probabilities"])
            np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)


def test_models_config_names_every_exported_model_with_its_base_path(tmp_path, tiny_keras_model,
                                                                      tiny):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from gpicl_tf.export import export_model

    model, cfg = tiny_keras_model, tiny
    out = str(tmp_path / "exports")
    os.makedirs(out)
    with open(os.path.join(out, "models.config"), "w") as f:  # an operator's own entry
        f.write('model_config_list { config { name: "other" base_path: "/srv/other" '
                'model_platform: "tensorflow" model_version_policy { all {} } } }\n')
    export_model(model, cfg, out, "alpha")
    export_model(model, cfg, out, "beta", serving_root="/data/exports")
    export_model(model, cfg, out, "alpha")  # a second version adds no entry
    parsed = model_server_config_pb2.ModelServerConfig()
    with open(os.path.join(out, "models.config")) as f:
        text_format.Parse(f.read(), parsed)
    entries = {c.name: c for c in parsed.model_config_list.config}
    assert sorted(entries) == ["alpha", "beta", "other"]
    assert entries["alpha"].base_path == "/models/alpha"
    assert entries["beta"].base_path == "/data/exports/beta"
    assert entries["alpha"].model_platform == "tensorflow"
    assert entries["other"].HasField("model_version_policy")  # kept as it was
    assert sorted(os.listdir(os.path.join(out, "alpha"))) == ["1", "2"]
    batching = open(os.path.join(out, "batching.config")).read()
    assert "pad_variable_length_inputs: false" in batching
    assert "max_batch_size { value: 64 }" in batching
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_an_unreadable_models_config_is_refused_before_anything_is_written(tmp_path,
                                                                           tiny_keras_model,
                                                                           tiny):
    from gpicl_tf.export import export_model

    model, cfg = tiny_keras_model, tiny
    out = str(tmp_path)
    with open(os.path.join(out, "models.config"), "w") as f:
        f.write("model_config_list { config { name: 'x' ")  # truncated
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match=r"models.config: expected a TF Serving model config"):
        export_model(model, cfg, out, "gamma")
    assert sorted(os.listdir(out)) == before


def test_an_existing_batching_config_is_never_overwritten(tmp_path, tiny_keras_model, tiny):
    from gpicl_tf.export import export_model

    model, cfg = tiny_keras_model, tiny
    with open(tmp_path / "batching.config", "w") as f:
        f.write("max_batch_size { value: 8 }\n")
    export_model(model, cfg, str(tmp_path), "delta")
    assert open(tmp_path / "batching.config").read() == "max_batch_size { value: 8 }\n"
