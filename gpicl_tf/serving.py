"""A client for TensorFlow Serving's REST API and the export's `serving_default`.

    client = TFServingClient("http://localhost:8501", "gpicl")
    client.status()                      # GET /v1/models/gpicl
    client.metadata()                    # GET /v1/models/gpicl/metadata
    mean = client.predict(context_x, context_y, query_x)   # [B, Nq, dy]
    # a model with the bar head (predictive distributions):
    out = client.predict_distribution(context_x, context_y, query_x)  # mean, std, quantiles
    qs = client.quantiles(context_x, context_y, query_x, [0.1, 0.9])  # [B, Nq, dy, 2]
    lp = client.log_prob(context_x, context_y, query_x, query_y)      # log_prob, cdf

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
    if fmt == "columnar":
        return {"signature_name": signature_name,
                "inputs": {"context_x": cx.tolist(), "context_y": cy.tolist(),
                           "query_x": qx.tolist()}}
    if fmt == "row":
        return {"signature_name": signature_name,
                "instances": [{"context_x": cx[i].tolist(), "context_y": cy[i].tolist(),
                               "query_x": qx[i].tolist()} for i in range(len(cx))]}
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
    ndim = 4 if output == "quantiles" else 3
    if expected_shape is not None and (arr.ndim != ndim
                                       or arr.shape[:2] != tuple(expected_shape)):
        tail = ", dy, levels" if ndim == 4 else ", dy"
        raise ServingError(f"unexpected reply: expected {output!r} of shape "
                           f"[{expected_shape[0]}, {expected_shape[1]}{tail}] for this "
                           f"request, got {list(arr.shape)}")
    return arr


class TFServingClient:
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

    def predict(self, context_x, context_y, query_x, fmt: str = "columnar") -> np.ndarray:
        """POST .../:predict on serving_default; returns mean [B, Nq, dy]."""
        return self._outputs(context_x, context_y, query_x, ("mean",), fmt=fmt)["mean"]

    def predict_distribution(self, context_x, context_y, query_x) -> dict:
        """serving_default of a bar-head model: mean, std [B, Nq, dy] and quantiles
        [B, Nq, dy, L] at the levels fixed at export (model_config's quantile_levels)."""
        return self._outputs(context_x, context_y, query_x, ("mean", "std", "quantiles"))

    def quantiles(self, context_x, context_y, query_x, levels) -> np.ndarray:
        """The `quantiles` signature: [B, Nq, dy, L] at `levels` (each in (0, 1))."""
        from gpicl_tf.distributions import check_levels

        extra = {"levels": check_levels(levels).tolist()}
        return self._outputs(context_x, context_y, query_x, ("quantiles",), "quantiles",
                             extra)["quantiles"]

    def log_prob(self, context_x, context_y, query_x, query_y) -> dict:
        """The `log_prob` signature: log density and CDF of query_y [B, Nq, dy]."""
        qy = _as_batch("query_y", query_y)
        extra = {"query_y": qy.tolist()}
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
        body = {"signature_name": "serving_default",
                "inputs": {"context_x": cx.tolist(), "context_y": ids.tolist(),
                           "query_x": qx.tolist()}}
        return parse_predict_response(self._call(f"{self.model_url}:predict", body),
                                      "probabilities", expected_shape=qx.shape[:2])

    def _outputs(self, context_x, context_y, query_x, names, signature="serving_default",
                 extra=None, fmt="columnar") -> dict:
        body = build_request(context_x, context_y, query_x, fmt, signature)
        if extra:
            body["inputs"].update(extra)
        reply = self._call(f"{self.model_url}:predict", body)
        qx = np.asarray(query_x)
        if len(names) > 1 and isinstance(reply, dict) and isinstance(reply.get("outputs"),
                                                                     list):
            raise ServingError(f"unexpected reply: expected outputs {list(names)}; the served "
                               "model returns one output (is it a model with the bar head, "
                               "model.head=bar?)")
        return {n: parse_predict_response(reply, n, expected_shape=qx.shape[:2])
                for n in names}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
