"""Clients of TensorFlow Serving's REST and gRPC APIs and the export's `serving_default`.

    client = TFServingClient("http://localhost:8501", "gpicl")
    client.status()                      # GET /v1/models/gpicl
    client.metadata()                    # GET /v1/models/gpicl/metadata
    mean = client.predict(context_x, context_y, query_x)   # [B, Nq, dy]
    # a model with the bar head (predictive distributions):
    out = client.predict_distribution(context_x, context_y, query_x)  # mean, std, quantiles
    qs = client.quantiles(context_x, context_y, query_x, [0.1, 0.9])  # [B, Nq, dy, 2]
    lp = client.log_prob(context_x, context_y, query_x, query_y)      # log_prob, cdf
    # the same calls over gRPC (TF Serving's port 8500), the Predict RPC:
    grpc_client = TFServingGRPCClient("localhost:8500", "gpicl")

Requests use the row ("instances", one object per task) or the columnar
("inputs") format. Replies `{"predictions": ...}` / `{"outputs": ...}` are parsed
to numpy; `{"error": ...}` replies raise ServingError with the server's message.
Only connection failures (refused, reset, dropped) are retried, with
exponential backoff; a timeout raises ServingTimeout at once. `timeout` bounds
the whole call, however slowly the server sends its reply. A reply that is not
JSON, lacks its keys, is ragged or does not match the request's shape raises
ServingError.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import threading
import time
import urllib.parse
from typing import Optional

import numpy as np

INPUTS = ("context_x", "context_y", "query_x")


class ServingError(RuntimeError):
    """TF Serving answered with an error; `status` is the HTTP status code."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class ServingTimeout(ServingError):
    """No reply within the client's timeout."""


def _as_batch(name: str, a, width: Optional[int] = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D array [batch, points, width], got shape "
                         f"{a.shape}")
    if width is not None and a.shape[-1] != width:
        raise ValueError(f"{name}: expected width {width}, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")
    return a


def validate_request(context_x, context_y, query_x, x_dim=None, y_dim=None):
    """Checks and converts the three inputs; raises ValueError naming the bad one."""
    cx = _as_batch("context_x", context_x, x_dim)
    cy = _as_batch("context_y", context_y, y_dim)
    qx = _as_batch("query_x", query_x, x_dim if x_dim is not None else cx.shape[-1])
    if cx.shape[:2] != cy.shape[:2]:
        raise ValueError(f"context_x {cx.shape} and context_y {cy.shape}: expected the same "
                         "[batch, points]")
    if cx.shape[0] != qx.shape[0]:
        raise ValueError(f"context_x {cx.shape} and query_x {qx.shape}: expected the same batch")
    if qx.shape[1] == 0:
        raise ValueError("query_x: expected at least one query point")
    return cx, cy, qx


def build_request(context_x, context_y, query_x, fmt: str = "columnar",
                  signature_name: str = "serving_default") -> dict:
    """The JSON body of a :predict request in TF Serving's row or columnar format."""
    cx, cy, qx = validate_request(context_x, context_y, query_x)
    return json_body(signature_name, {"context_x": cx, "context_y": cy, "query_x": qx}, fmt)


def json_body(signature_name: str, inputs: dict, fmt: str = "columnar") -> dict:
    """A :predict body of named arrays, columnar ("inputs") or row ("instances", one
    object per batch entry)."""
    if fmt == "columnar":
        return {"signature_name": signature_name,
                "inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}
    if fmt == "row":
        n = len(next(iter(inputs.values())))
        return {"signature_name": signature_name,
                "instances": [{k: np.asarray(v)[i].tolist() for k, v in inputs.items()}
                              for i in range(n)]}
    raise ValueError(f"fmt={fmt!r}: expected 'columnar' or 'row'")


def parse_predict_response(body, output: str = "mean", expected_shape=None) -> np.ndarray:
    """The `output` tensor of a :predict reply in either format.

    Args:
      body: the decoded JSON reply.
      output: the output's name.
      expected_shape: (B, Nq) the request asked for; the reply must be [B, Nq, dy].
    Raises:
      ServingError: an error reply, missing keys, a ragged or non-numeric
        tensor, or a shape that does not match the request.
    """
    if not isinstance(body, dict):
        raise ServingError(f"unexpected reply: expected a JSON object, got "
                           f"{type(body).__name__}")
    if "error" in body:
        raise ServingError(str(body["error"]))
    try:
        if "outputs" in body:  # columnar
            out = body["outputs"]
            out = out[output] if isinstance(out, dict) else out
        elif "predictions" in body:  # row: one entry per instance
            out = [p[output] if isinstance(p, dict) else p for p in body["predictions"]]
        else:
            raise ServingError(f"unexpected reply: expected 'outputs', 'predictions' or "
                               f"'error', got keys {sorted(body)}")
        arr = np.asarray(out, dtype=np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise ServingError(f"unexpected reply: output {output!r} is missing, ragged or not "
                           f"numeric ({e})") from None
    return check_output(arr, output, expected_shape)


def check_output(arr: np.ndarray, output: str, expected_shape=None) -> np.ndarray:
    """arr, if it is the [B, Nq, dy] (quantiles: [B, Nq, dy, L]) reply a request of
    (B, Nq) asked for; ServingError otherwise."""
    ndim = 4 if output == "quantiles" else 3
    if expected_shape is not None and (arr.ndim != ndim
                                       or arr.shape[:2] != tuple(expected_shape)):
        tail = ", dy, levels" if ndim == 4 else ", dy"
        raise ServingError(f"unexpected reply: expected {output!r} of shape "
                           f"[{expected_shape[0]}, {expected_shape[1]}{tail}] for this "
                           f"request, got {list(arr.shape)}")
    return arr


class _PredictAPI:
    """The predict calls both clients offer; each transport implements `_run`."""

    def predict(self, context_x, context_y, query_x, fmt: str = "columnar") -> np.ndarray:
        """serving_default; returns mean [B, Nq, dy]."""
        return self._outputs(context_x, context_y, query_x, ("mean",), fmt=fmt)["mean"]

    def predict_distribution(self, context_x, context_y, query_x) -> dict:
        """serving_default of a bar-head model: mean, std [B, Nq, dy] and quantiles
        [B, Nq, dy, L] at the levels fixed at export (model_config's quantile_levels)."""
        return self._outputs(context_x, context_y, query_x, ("mean", "std", "quantiles"))

    def quantiles(self, context_x, context_y, query_x, levels) -> np.ndarray:
        """The `quantiles` signature: [B, Nq, dy, L] at `levels` (each in (0, 1))."""
        from gpicl_tf.distributions import check_levels

        extra = {"levels": check_levels(levels)}
        return self._outputs(context_x, context_y, query_x, ("quantiles",), "quantiles",
                             extra)["quantiles"]

    def log_prob(self, context_x, context_y, query_x, query_y) -> dict:
        """The `log_prob` signature: log density and CDF of query_y [B, Nq, dy]."""
        extra = {"query_y": _as_batch("query_y", query_y)}
        return self._outputs(context_x, context_y, query_x, ("log_prob", "cdf"), "log_prob",
                             extra)

    def classify(self, context_x, class_ids, query_x) -> np.ndarray:
        """serving_default of a classification model: class ids [B, Nc] (integers in
        [0, C)) -> probabilities [B, Nq, C]."""
        cx = _as_batch("context_x", context_x)
        qx = _as_batch("query_x", query_x, cx.shape[-1])
        ids = np.asarray(class_ids)
        if ids.shape != cx.shape[:2] or ids.dtype.kind not in "iu":
            raise ValueError(f"class_ids: expected integers of shape {list(cx.shape[:2])} "
                             f"(batch, context points), got {ids.dtype} {list(ids.shape)}")
        inputs = {"context_x": cx, "context_y": ids.astype(np.int64), "query_x": qx}
        return self._run("serving_default", inputs, ("probabilities",),
                         qx.shape[:2])["probabilities"]

    def _outputs(self, context_x, context_y, query_x, names, signature="serving_default",
                 extra=None, fmt="columnar") -> dict:
        cx, cy, qx = validate_request(context_x, context_y, query_x)
        inputs = {"context_x": cx, "context_y": cy, "query_x": qx, **(extra or {})}
        return self._run(signature, inputs, names, qx.shape[:2], fmt)

    def _run(self, signature, inputs, names, expected_shape, fmt="columnar") -> dict:
        raise NotImplementedError


class TFServingClient(_PredictAPI):
    """REST client of one model on a TF Serving server.

    Args:
      base_url: e.g. "http://localhost:8501".
      model_name: the served model's name (URL-quoted in requests).
      version: a version number, or None for the one the server prefers.
      timeout: seconds one call may take in all (connect, send, the whole
        reply), per attempt.
      retries: extra attempts after a connection failure.
      backoff: seconds before the first retry; doubled each time.
    """

    def __init__(self, base_url: str = "http://localhost:8501", model_name: str = "gpicl",
                 version: Optional[int] = None, timeout: float = 10.0, retries: int = 3,
                 backoff: float = 0.2):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.path.strip("/"):
            raise ValueError(f"base_url={base_url!r}: expected http://host:port or "
                             "https://host:port")
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name={model_name!r}: expected a non-empty string")
        if version is not None and (not _is_int(version) or version < 1):
            raise ValueError(f"version={version!r}: expected None or an integer >= 1")
        if not _is_num(timeout) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout={timeout!r}: expected a number of seconds > 0")
        if not _is_int(retries) or retries < 0:
            raise ValueError(f"retries={retries!r}: expected an integer >= 0")
        if not _is_num(backoff) or backoff < 0:
            raise ValueError(f"backoff={backoff!r}: expected a number of seconds >= 0")
        self.base_url = base_url.rstrip("/")
        self._url = url
        self.model_name = model_name
        self.version = version
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = backoff

    @property
    def model_url(self) -> str:
        url = f"{self.base_url}/v1/models/{urllib.parse.quote(self.model_name, safe='')}"
        return url if self.version is None else f"{url}/versions/{int(self.version)}"

    def _once(self, path: str, data: Optional[bytes]):
        """One HTTP exchange within self.timeout in all: (status, body bytes)."""
        cls = (http.client.HTTPSConnection if self._url.scheme == "https"
               else http.client.HTTPConnection)
        conn = cls(self._url.hostname, self._url.port, timeout=self.timeout)
        expired = threading.Event()

        def abort():  # wakes a read blocked on a slow (dripping) server
            expired.set()
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, abort)
        timer.daemon = True
        timer.start()
        try:
            conn.request("GET" if data is None else "POST", path, body=data,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            if expired.is_set():
                raise TimeoutError
            return resp.status, raw
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError from None
            raise
        finally:
            timer.cancel()
            conn.close()

    def _call(self, url: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        path = url[len(self.base_url):] or "/"
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                status, raw = self._once(path, data)
            except (socket.timeout, TimeoutError):
                raise ServingTimeout(f"{url}: no reply within {self.timeout:g} s") from None
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine,
                    OSError) as e:
                if attempt == self.retries:
                    raise ServingError(f"{url}: connection failed after {attempt + 1} "
                                       f"attempts: {e}") from e
                time.sleep(delay)
                delay *= 2
                continue
            text = raw.decode(errors="replace")
            try:
                reply = json.loads(text or "{}")
            except json.JSONDecodeError:
                if status >= 400:
                    raise ServingError(f"{url}: HTTP {status}: {text[:300]}", status) from None
                raise ServingError(f"{url}: unexpected reply: expected JSON, got "
                                   f"{text[:100]!r}", status) from None
            if status >= 400:  # the server answered: never retried
                msg = reply.get("error", text) if isinstance(reply, dict) else text
                raise ServingError(f"{url}: HTTP {status}: {msg}", status)
            return reply
        raise AssertionError("unreachable")

    def status(self) -> dict:
        """GET /v1/models/<name>[/versions/<v>]: the model's version states."""
        return self._call(self.model_url)

    def metadata(self) -> dict:
        """GET .../metadata: signatures with their input and output names."""
        return self._call(f"{self.model_url}/metadata")

    def model_config(self) -> str:
        """The served model's config JSON (its `model_config` signature)."""
        reply = self._call(f"{self.model_url}:predict",
                           {"signature_name": "model_config", "inputs": {"unused": [0.0]}})
        out = reply.get("outputs") if isinstance(reply, dict) else None
        if isinstance(out, dict):
            out = out.get("config_json")
        if isinstance(out, list) and len(out) == 1:
            out = out[0]
        if not isinstance(out, str):
            raise ServingError(f"{self.model_url}: unexpected model_config reply: expected "
                               "{'outputs': '<config json>'} (an export of gpicl_tf)")
        return out

    def _run(self, signature, inputs, names, expected_shape, fmt="columnar") -> dict:
        """POST .../:predict in the row or columnar format; the named outputs."""
        body = json_body(signature, inputs, fmt)
        reply = self._call(f"{self.model_url}:predict", body)
        if len(names) > 1 and isinstance(reply, dict) and isinstance(reply.get("outputs"),
                                                                     list):
            raise ServingError(f"unexpected reply: expected outputs {list(names)}; the served "
                               "model returns one output (is it a model with the bar head, "
                               "model.head=bar?)")
        return {n: parse_predict_response(reply, n, expected_shape=expected_shape)
                for n in names}


# gRPC status codes as the HTTP statuses TF Serving's REST API gives for them, so
# callers (the estimator) handle both transports alike: 400 is a refused input.
_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
                "NOT_FOUND": 404, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
                "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
                "INTERNAL": 500, "UNKNOWN": 500, "DEADLINE_EXCEEDED": 504}


class TFServingGRPCClient(_PredictAPI):
    """gRPC client of one model on a TF Serving server (its PredictionService, port 8500
    by default), with the REST client's calls, errors, deadlines and retries.

        client = TFServingGRPCClient("localhost:8500", "gpicl")
        mean = client.predict(context_x, context_y, query_x)

    Args:
      target: "host:port" of the server's gRPC port.
      model_name, version, timeout, retries, backoff: as TFServingClient; `timeout`
        is each attempt's gRPC deadline. Only UNAVAILABLE (no connection, or the
        server went away) is retried; DEADLINE_EXCEEDED raises ServingTimeout at
        once; any other status raises ServingError whose `status` is the HTTP status
        TF Serving's REST API gives for it (INVALID_ARGUMENT: 400) and whose `code`
        is the gRPC status name.
    """

    def __init__(self, target: str = "localhost:8500", model_name: str = "gpicl",
                 version: Optional[int] = None, timeout: float = 10.0, retries: int = 3,
                 backoff: float = 0.2):
        host, _, port = target.rpartition(":") if isinstance(target, str) else ("", "", "")
        if not host or not port.isdigit() or "/" in target:
            raise ValueError(f"target={target!r}: expected host:port of a TF Serving gRPC "
                             "port, e.g. localhost:8500")
        # the REST client checks the shared arguments and keeps them
        rest = TFServingClient(f"http://{host}:{port}", model_name, version, timeout, retries,
                               backoff)
        self.target = target
        self.model_name, self.version = rest.model_name, rest.version
        self.timeout, self.retries, self.backoff = rest.timeout, rest.retries, rest.backoff
        self._channel = None

    def _stubs(self):
        if self._channel is None:
            import grpc
            from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

            self._channel = grpc.insecure_channel(self.target, options=[
                ("grpc.max_send_message_length", 256 << 20),
                ("grpc.max_receive_message_length", 256 << 20)])
            self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(
                self._channel)
            self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
        return self._predict_stub, self._model_stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # a channel does not pickle; reopened on use
        return dict(self.__dict__, _channel=None)

    def _spec(self, spec, signature: Optional[str] = None):
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = int(self.version)
        if signature is not None:
            spec.signature_name = signature

    def _rpc(self, method: str, request):
        """One RPC with the deadline and the retries of UNAVAILABLE."""
        import grpc

        what = f"{self.target} {method} {self.model_name!r}"
        delay = self.backoff
        for attempt in range(self.retries + 1):
            predict_stub, model_stub = self._stubs()
            stub = model_stub if method == "GetModelStatus" else predict_stub
            try:
                return getattr(stub, method)(request, timeout=self.timeout)
            except grpc.RpcError as e:
                code = e.code()
                name = getattr(code, "name", str(code))
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise ServingTimeout(f"{what}: no reply within {self.timeout:g} s"
                                         ) from None
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                err = ServingError(f"{what}: {name}: {e.details()}", _HTTP_STATUS.get(name))
                err.code = name
                if code == grpc.StatusCode.UNAVAILABLE:
                    err.args = (f"{what}: connection failed after {attempt + 1} attempts: "
                                f"{e.details()}",)
                raise err from None
        raise AssertionError("unreachable")

    def status(self) -> dict:
        """GetModelStatus: the model's version states, as the REST API's JSON."""
        from google.protobuf.json_format import MessageToDict
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        return MessageToDict(self._rpc("GetModelStatus", request),
                             preserving_proto_field_name=True)

    def metadata(self) -> dict:
        """GetModelMetadata: the signatures with their inputs and outputs."""
        from google.protobuf.json_format import MessageToDict
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec)
        request.metadata_field.append("signature_def")
        return MessageToDict(self._rpc("GetModelMetadata", request),
                             preserving_proto_field_name=True)

    def model_config(self) -> str:
        """The served model's config JSON (its `model_config` signature)."""
        out = self._predict("model_config", {"unused": np.zeros([1], np.float32)})
        value = out.get("config_json")
        if value is None or value.size != 1:
            raise ServingError(f"{self.target}: unexpected model_config reply: expected "
                               "config_json (an export of gpicl_tf)")
        value = value.reshape(-1)[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    def _predict(self, signature: str, inputs: dict) -> dict:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature)
        for name, value in inputs.items():
            value = np.asarray(value)
            dtype = tf.int64 if value.dtype.kind in "iu" else tf.float32
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype))
        reply = self._rpc("Predict", request)
        return {k: tf.make_ndarray(v) for k, v in reply.outputs.items()}

    def _run(self, signature, inputs, names, expected_shape, fmt="columnar") -> dict:
        out = self._predict(signature, inputs)
        missing = [n for n in names if n not in out]
        if missing:
            raise ServingError(f"unexpected reply: expected outputs {list(names)}, got "
                               f"{sorted(out)} (is it a model with the bar head, "
                               "model.head=bar?)")
        return {n: check_output(np.asarray(out[n], np.float32), n, expected_shape)
                for n in names}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
