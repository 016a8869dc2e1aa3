"""The gRPC client (issue 7/7) against an in-process TF Serving PredictionService on
127.0.0.1: the same numbers as the REST path and the estimator, the same errors,
deadlines and retries."""

import time

import numpy as np
import pytest

from fake_serving import FakeGrpcServing, FakeServing
from gpicl_tf import InContextClassifier, InContextRegressor
from gpicl_tf.serving import (ServingError, ServingTimeout, TFServingClient,
                              TFServingGRPCClient)


def _req(b=2, nc=7, nq=4, width=1, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (b, nc, width)), rng.normal(size=(b, nc, 1)),
            rng.uniform(-1, 1, (b, nq, width)))


@pytest.fixture(scope="module")
def bar_export(tmp_path_factory):
    from test_bar_head import _bar_model

    from gpicl_tf.export import export_model

    model, cfg = _bar_model()
    return export_model(model, cfg, str(tmp_path_factory.mktemp("gbar")), "gpicl")


def test_grpc_gives_the_rest_paths_and_the_estimators_numbers(tiny_export_dir):
    cx, cy, qx = _req()
    with FakeServing(versions={1: f"{tiny_export_dir}/1"}) as rest, \
            FakeGrpcServing(versions={1: f"{tiny_export_dir}/1"}) as srv:
        g = TFServingGRPCClient(srv.target, "gpicl", timeout=10)
        r = TFServingClient(rest.url, "gpicl", timeout=10)
        via_grpc = g.predict(cx, cy, qx)
        assert via_grpc.shape == (2, 4, 1)
        np.testing.assert_allclose(via_grpc, r.predict(cx, cy, qx), rtol=1e-6, atol=1e-7)
        assert srv.requests == ["serving_default"]
        # the estimator on a grpc:// target equals the estimator on the folder
        est = InContextRegressor(f"grpc://{srv.target}/gpicl").fit(cx[0], cy[0, :, 0])
        local = InContextRegressor(tiny_export_dir).fit(cx[0], cy[0, :, 0])
        np.testing.assert_allclose(est.predict(qx[0]), local.predict(qx[0]), rtol=1e-5,
                                   atol=1e-6)
        assert "model_config" in srv.requests  # widths and limit from the served model
        assert g.status()["model_version_status"][0]["state"] == "AVAILABLE"
        assert g.metadata()["model_spec"]["name"] == "gpicl"


def test_grpc_distribution_quantiles_and_log_prob_equal_rest(bar_export):
    cx, cy, qx = _req(seed=1)
    qy = np.random.default_rng(2).normal(size=qx.shape[:2] + (1,))
    with FakeServing(versions={1: bar_export}) as rest, \
            FakeGrpcServing(versions={1: bar_export}) as srv:
        g, r = TFServingGRPCClient(srv.target), TFServingClient(rest.url)
        for a, b in ((g.predict_distribution(cx, cy, qx), r.predict_distribution(cx, cy, qx)),
                     (g.log_prob(cx, cy, qx, qy), r.log_prob(cx, cy, qx, qy)),
                     ({"q": g.quantiles(cx, cy, qx, [0.1, 0.9])},
                      {"q": r.quantiles(cx, cy, qx, [0.1, 0.9])})):
            assert sorted(a) == sorted(b)
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
        assert g.quantiles(cx, cy, qx, [0.1, 0.9]).shape == (2, 4, 1, 2)
        est = InContextRegressor(f"grpc://{srv.target}/gpicl").fit(cx[0], cy[0, :, 0])
        mean, std = est.predict(qx[0], return_std=True)
        local = InContextRegressor(bar_export).fit(cx[0], cy[0, :, 0])
        np.testing.assert_allclose(std, local.predict(qx[0], return_std=True)[1], rtol=1e-5)


def test_grpc_classification_equals_the_local_classifier(tmp_path_factory):
    from test_classifier import _classifier

    _, _, path = _classifier(tmp_path_factory, name="gcls")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    with FakeGrpcServing("gpicl-classify", versions={1: path}) as srv:
        remote = InContextClassifier(f"grpc://{srv.target}/gpicl-classify").fit(X, y)
        local = InContextClassifier(path).fit(X, y)
        np.testing.assert_allclose(remote.predict_proba(X[:5]), local.predict_proba(X[:5]),
                                   rtol=1e-5, atol=1e-6)


def test_a_server_error_is_a_serving_error_with_its_status_and_is_not_retried(
        tiny_export_dir):
    cx, cy, qx = _req()
    with FakeGrpcServing(versions={1: f"{tiny_export_dir}/1"}) as srv:
        g = TFServingGRPCClient(srv.target, retries=3, backoff=0.01)
        wide = np.concatenate([cx, cx], -1), cy, np.concatenate([qx, qx], -1)
        with pytest.raises(ServingError, match="context_x: expected last dimension") as e:
            g.predict(*wide)
        assert e.value.status == 400 and e.value.code == "INVALID_ARGUMENT"
        assert len(srv.requests) == 1
        with pytest.raises(ServingError, match=r"NOT_FOUND.*Specific\(gpicl, 9\)") as e:
            TFServingGRPCClient(srv.target, version=9).predict(cx, cy, qx)
        assert e.value.status == 404
        # the estimator turns a refused input into a ValueError, as over REST
        est = InContextRegressor(f"grpc://{srv.target}/gpicl").fit(cx[0], cy[0, :, 0])
        srv.fail = (__import__("grpc").StatusCode.INVALID_ARGUMENT, "query_x: bad")
        with pytest.raises(ValueError, match="refused the input.*query_x: bad"):
            est.predict(qx[0])


def test_a_deadline_raises_serving_timeout_promptly_without_retry(tiny_export_dir):
    cx, cy, qx = _req()
    with FakeGrpcServing(versions={1: f"{tiny_export_dir}/1"}) as srv:
        srv.delay = 1.5
        g = TFServingGRPCClient(srv.target, timeout=0.3, retries=3)
        t0 = time.perf_counter()
        with pytest.raises(ServingTimeout, match="no reply within 0.3 s"):
            g.predict(cx, cy, qx)
        assert time.perf_counter() - t0 < 1.2 and len(srv.requests) == 1


def test_unavailable_is_retried_with_backoff_and_a_dead_server_fails_after_retries(
        tiny_export_dir):
    cx, cy, qx = _req()
    with FakeGrpcServing(versions={1: f"{tiny_export_dir}/1"}) as srv:
        srv.unavailable_next = 2
        out = TFServingGRPCClient(srv.target, retries=2, backoff=0.01).predict(cx, cy, qx)
        assert out.shape == (2, 4, 1) and len(srv.requests) == 3
        srv.unavailable_next = 5
        with pytest.raises(ServingError, match="connection failed after 2 attempts") as e:
            TFServingGRPCClient(srv.target, retries=1, backoff=0.01).predict(cx, cy, qx)
        assert e.value.status == 503
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ServingError, match="connection failed after 3 attempts"):
        TFServingGRPCClient(f"127.0.0.1:{port}", retries=2, backoff=0.05,
                            timeout=2).predict(cx, cy, qx)
    assert time.perf_counter() - t0 >= 0.15  # backed off 0.05 + 0.1


@pytest.mark.parametrize("target, match", [
    ("localhost", "expected host:port"), ("http://localhost:8500", "expected host:port"),
    (8500, "expected host:port")])
def test_grpc_client_arguments_are_validated(target, match):
    with pytest.raises(ValueError, match=match):
        TFServingGRPCClient(target)
    with pytest.raises(ValueError, match="timeout"):
        TFServingGRPCClient("localhost:8500", timeout=0)


def test_estimator_grpc_targets_are_validated():
    with pytest.raises(ValueError, match=r"grpc://host:port/<name>"):
        InContextRegressor("grpc://localhost/gpicl").fit([[0.0]], [0.0])
