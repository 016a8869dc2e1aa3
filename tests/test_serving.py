import json
import time

import numpy as np
import pytest

from fake_serving import FakeServing, decode_request
from gpicl_tf.serving import (ServingError, ServingTimeout, TFServingClient, build_request,
                              parse_predict_response)


def _req(b=2, nc=5, nq=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (b, nc, 1)), rng.normal(size=(b, nc, 1)),
            rng.uniform(-1, 1, (b, nq, 1)))


@pytest.mark.parametrize("fmt", ["row", "columnar"])
def test_request_decoded_as_tf_serving_does_gives_the_estimator_predictions(
        tiny_export_dir, fmt):
    import tensorflow as tf

    from gpicl_tf import InContextRegressor

    cx, cy, qx = _req(b=1, nc=9, nq=6)
    body = json.loads(json.dumps(build_request(cx, cy, qx, fmt)))  # through JSON text
    assert body["signature_name"] == "serving_default"
    tensors = decode_request(body, ["context_x", "context_y", "query_x"])
    sig = tf.saved_model.load(f"{tiny_export_dir}/1").signatures["serving_default"]
    served = sig(**{k: tf.constant(v) for k, v in tensors.items()})["mean"].numpy()
    est = InContextRegressor(tiny_export_dir).fit(cx[0], cy[0, :, 0])
    np.testing.assert_allclose(served[0, :, 0], est.predict(qx[0]), rtol=1e-5, atol=1e-5)


def test_status_metadata_and_predict_in_both_formats(tiny_export_dir):
    with FakeServing(versions={1: f"{tiny_export_dir}/1"}) as srv:
        c = TFServingClient(srv.url, "gpicl", timeout=5)
        assert c.status()["model_version_status"][0]["state"] == "AVAILABLE"
        assert c.metadata()["metadata"]["signature_def"]["inputs"] == [
            "context_x", "context_y", "query_x"]
        cx, cy, qx = _req()
        row, col = c.predict(cx, cy, qx, fmt="row"), c.predict(cx, cy, qx, fmt="columnar")
        assert row.shape == (2, 3, 1)
        np.testing.assert_allclose(row, col, rtol=1e-6)


def test_server_error_becomes_an_exception_with_its_message_and_is_not_retried(
        tiny_export_dir):
    with FakeServing(versions={1: f"{tiny_export_dir}/1"}) as srv:
        c = TFServingClient(srv.url, "gpicl", retries=3, backoff=0.01)
        cx, cy, qx = _req()
        # A width the signature rejects: the graph-side check's message comes back.
        body = build_request(np.concatenate([cx, cx], -1), cy, np.concatenate([qx, qx], -1))
        with pytest.raises(ServingError, match="context_x: expected last dimension") as e:
            parse_predict_response(c._call(f"{c.model_url}:predict", body))
        assert e.value.status == 400 and srv.requests == 1
        with pytest.raises(ServingError, match=r"HTTP 404.*Specific\(gpicl, 9\)"):
            TFServingClient(srv.url, "gpicl", version=9).status()
        srv.force = (503, {"error": "overloaded"})
        with pytest.raises(ServingError, match="HTTP 503: overloaded"):
            c.status()


def test_dropped_connections_are_retried_with_backoff(tiny_export_dir):
    with FakeServing(versions={1: f"{tiny_export_dir}/1"}) as srv:
        c = TFServingClient(srv.url, "gpicl", retries=3, backoff=0.05)
        srv.drop_next = 2
        tic = time.perf_counter()
        assert c.status()["model_version_status"]
        assert srv.requests == 3
        assert time.perf_counter() - tic >= 0.05 + 0.1  # waited 0.05 then 0.1
        srv.drop_next, srv.requests = 100, 0
        with pytest.raises(ServingError, match="connection failed after 3 attempts"):
            TFServingClient(srv.url, "gpicl", retries=2, backoff=0.01).status()
        assert srv.requests == 3


def test_timeout_raises_promptly_without_retry(tiny_export_dir):
    with FakeServing(versions={1: f"{tiny_export_dir}/1"}) as srv:
        srv.delay = 2.0
        c = TFServingClient(srv.url, "gpicl", timeout=0.3, retries=3)
        tic = time.perf_counter()
        with pytest.raises(ServingTimeout, match="no reply within 0.3 s"):
            c.status()
        assert time.perf_counter() - tic < 1.5 and srv.requests == 1


def test_refused_connection_fails_after_retries():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ServingError, match="connection failed after 2 attempts"):
        TFServingClient(f"http://127.0.0.1:{port}", "gpicl", retries=1, backoff=0.01).status()


@pytest.mark.parametrize("reply,match", [
    ({"error": "Input size mismatch"}, "Input size mismatch"),
    ({"weird": 1}, "expected 'outputs', 'predictions' or 'error'"),
])
def test_reply_parsing_errors(reply, match):
    with pytest.raises(ServingError, match=match):
        parse_predict_response(reply)


def test_reply_parsing_row_and_columnar_with_named_outputs():
    assert parse_predict_response({"outputs": {"mean": [[[1.0]]]}}).shape == (1, 1, 1)
    assert parse_predict_response({"predictions": [{"mean": [[2.0]]}]}).tolist() == [[[2.0]]]


def test_timeout_bounds_the_whole_call_against_a_dripping_server(tiny_export_dir):
    # Issue 10/10: one byte every 0.5 s kept a 2 s timeout waiting 30 s.
    with FakeServing(versions={1: f"{tiny_export_dir}/1"}) as srv:
        srv.drip = 0.5
        c = TFServingClient(srv.url, "gpicl", timeout=2, retries=3)
        tic = time.perf_counter()
        with pytest.raises(ServingTimeout, match="no reply within 2 s"):
            c.status()
        assert time.perf_counter() - tic < 2.5
        assert srv.requests == 1  # a timeout is not retried


@pytest.mark.parametrize("status,body,match", [
    (200, b"<html>not json</html>", "expected JSON"),
    (200, {"outputs": {"other": [[[1.0]]]}}, "missing, ragged or not numeric"),
    (200, {"outputs": [[[1.0], [2.0]], [[3.0]]]}, "missing, ragged or not numeric"),
    (200, {"outputs": [[[1.0]]]}, r"expected 'mean' of shape \[2, 5, dy\]"),  # 1 value, 5 asked
    (200, {"predictions": "x"}, "missing, ragged or not numeric"),
    (200, [1, 2], "expected a JSON object"),
    (500, b"oops", "HTTP 500: oops"),
])
def test_every_malformed_reply_is_a_serving_error(status, body, match):
    with FakeServing() as srv:
        srv.force = (status, body)
        c = TFServingClient(srv.url, "gpicl", timeout=5, retries=0)
        cx, cy, qx = _req(b=2, nq=5)
        with pytest.raises(ServingError, match=match):
            c.predict(cx, cy, qx)


@pytest.mark.parametrize("kwargs,match", [
    ({"retries": -1}, "retries=-1"), ({"retries": 1.5}, "retries=1.5"),
    ({"timeout": 0}, "timeout=0"), ({"timeout": float("inf")}, "timeout=inf"),
    ({"timeout": "5"}, "timeout='5'"), ({"base_url": "localhost:8501"}, "base_url"),
    ({"base_url": "ftp://h:1"}, "base_url"), ({"model_name": ""}, "model_name"),
    ({"version": 0}, "version=0"),
])
def test_client_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TFServingClient(**kwargs)


def test_model_names_are_url_quoted():
    c = TFServingClient("http://127.0.0.1:1", "a b/../x?y", version=2)
    assert c.model_url == "http://127.0.0.1:1/v1/models/a%20b%2F..%2Fx%3Fy/versions/2"
