"""A client for TensorFlow Serving's REST API and the export's `serving_default`.

    client = TFServingClient("http://localhost:8501", "gpicl")
    client.status()                      # GET /v1/models/gpicl
    client.metadata()                    # GET /v1/models/gpicl/metadata
    mean = client.predict(context_x, context_y, query_x)   # [B, Nq, dy]

Requests use the row ("instances", one object per task) or the columnar
("inputs") format. Replies `{"predictions": ...}` / `{"outputs": ...}` are parsed
to numpy; `{"error": ...}` replies raise ServingError with the server's message.
Only connection failures (refused, reset, dropped) are retried, with
exponential backoff; a timeout raises ServingTimeout at once.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
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


def parse_predict_response(body: dict, output: str = "mean") -> np.ndarray:
    """The `output` tensor of a :predict reply in either format; errors raise ServingError."""
    if "error" in body:
        raise ServingError(str(body["error"]))
    if "outputs" in body:  # columnar
        out = body["outputs"]
        out = out[output] if isinstance(out, dict) else out
    elif "predictions" in body:  # row: one entry per instance
        preds = body["predictions"]
        out = [p[output] if isinstance(p, dict) else p for p in preds]
    else:
        raise ServingError(f"unexpected reply: expected 'outputs', 'predictions' or 'error', "
                           f"got keys {sorted(body)}")
    return np.asarray(out, dtype=np.float32)


class TFServingClient:
    """REST client of one model on a TF Serving server.

    Args:
      base_url: e.g. "http://localhost:8501".
      model_name: the served model's name.
      version: a version number, or None for the one the server prefers.
      timeout: seconds per HTTP request.
      retries: extra attempts after a connection failure.
      backoff: seconds before the first retry; doubled each time.
    """

    def __init__(self, base_url: str = "http://localhost:8501", model_name: str = "gpicl",
                 version: Optional[int] = None, timeout: float = 10.0, retries: int = 3,
                 backoff: float = 0.2):
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    @property
    def model_url(self) -> str:
        url = f"{self.base_url}/v1/models/{self.model_name}"
        return url if self.version is None else f"{url}/versions/{int(self.version)}"

    def _call(self, url: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode() or "{}")
            except urllib.error.HTTPError as e:  # the server answered: never retried
                raw = e.read().decode(errors="replace")
                try:
                    msg = json.loads(raw).get("error", raw)
                except json.JSONDecodeError:
                    msg = raw or e.reason
                raise ServingError(f"{url}: HTTP {e.code}: {msg}", e.code) from None
            except (socket.timeout, TimeoutError) as e:
                raise ServingTimeout(f"{url}: no reply within {self.timeout} s") from e
            except (urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected,
                    http.client.BadStatusLine) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    raise ServingTimeout(f"{url}: no reply within {self.timeout} s") from e
                if attempt == self.retries:
                    raise ServingError(f"{url}: connection failed after {attempt + 1} "
                                       f"attempts: {reason}") from e
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def status(self) -> dict:
        """GET /v1/models/<name>[/versions/<v>]: the model's version states."""
        return self._call(self.model_url)

    def metadata(self) -> dict:
        """GET .../metadata: signatures with their input and output names."""
        return self._call(f"{self.model_url}/metadata")

    def predict(self, context_x, context_y, query_x, fmt: str = "columnar") -> np.ndarray:
        """POST .../:predict on serving_default; returns mean [B, Nq, dy]."""
        body = build_request(context_x, context_y, query_x, fmt)
        return parse_predict_response(self._call(f"{self.model_url}:predict", body))
