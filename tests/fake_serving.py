"""A stand-in for TensorFlow Serving's REST API on 127.0.0.1, for tests.

It decodes :predict requests by TF Serving's documented JSON rules (row format:
"instances" batched along dimension 0, one object of named inputs per
instance; columnar format: "inputs" maps names to whole tensors), runs the
SavedModel signature, and answers {"predictions": ...} / {"outputs": ...},
or {"error": ...} with status 400 when the signature rejects the input.
Scripted faults (status codes, dropped connections, delays) test the client.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def decode_request(body: dict, input_names) -> dict:
    """Tensors of a :predict body, as TF Serving decodes them."""
    if "instances" in body:
        inst = body["instances"]
        if not isinstance(inst, list) or not inst:
            raise ValueError("'instances' must be a non-empty list")
        if len(input_names) == 1 and not isinstance(inst[0], dict):
            return {input_names[0]: np.asarray(inst, np.float32)}
        return {n: np.stack([np.asarray(i[n], np.float32) for i in inst]) for n in input_names}
    if "inputs" in body:
        inp = body["inputs"]
        if not isinstance(inp, dict):
            return {input_names[0]: np.asarray(inp, np.float32)}
        return {n: np.asarray(inp[n], np.float32) for n in input_names}
    raise ValueError("missing 'instances' or 'inputs'")


def _jsonable(v):
    v = np.asarray(v)
    if v.dtype.kind in "SO":  # strings (TF Serving returns them as JSON strings)
        return v.astype(str).tolist() if v.ndim else v.item().decode()
    return v.tolist()


def encode_reply(outputs: dict, row: bool) -> dict:
    outputs = {k: _jsonable(v) for k, v in outputs.items()}
    names = sorted(outputs)
    if row:
        n = len(next(iter(outputs.values())))
        if len(names) == 1:
            return {"predictions": outputs[names[0]]}
        return {"predictions": [{k: outputs[k][i] for k in names} for i in range(n)]}
    if len(names) == 1:
        return {"outputs": outputs[names[0]]}
    return {"outputs": outputs}


class FakeServing:
    """Serves one model (name, version -> SavedModel dir) or scripted faults."""

    def __init__(self, name="gpicl", versions=None):
        self.name = name
        self.versions = versions or {}
        self.requests = 0
        self.drop_next = 0        # drop this many connections before answering
        self.delay = 0.0          # seconds to wait before answering
        self.force = None         # (status, body) to answer instead of the model
        self.drip = None          # seconds between single bytes of the reply
        self._loaded = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer._handle(self, None)

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                outer._handle(self, self.rfile.read(n))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.server.shutdown()
        self.server.server_close()

    def _sig(self, version, name="serving_default"):
        import tensorflow as tf

        if version not in self._loaded:
            self._loaded[version] = tf.saved_model.load(self.versions[version])
        return self._loaded[version].signatures[name]

    def _reply(self, h, status, body):
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        if self.drip:  # a server that sends one byte every `drip` seconds
            head = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n").encode() + data
            for i in range(len(head)):
                try:
                    h.wfile.write(head[i:i + 1])
                    h.wfile.flush()
                except OSError:
                    return
                time.sleep(self.drip)
            return
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h, raw):
        import tensorflow as tf

        self.requests += 1
        if self.drop_next > 0:
            self.drop_next -= 1
            h.close_connection = True
            h.connection.close()  # the client sees the connection dropped
            return
        if self.delay:
            time.sleep(self.delay)
        if self.force:
            return self._reply(h, *self.force)
        path = h.path
        prefix = f"/v1/models/{self.name}"
        if not path.startswith(prefix):
            return self._reply(h, 404, {"error": f"Servable not found for request: {path}"})
        rest = path[len(prefix):]
        version = max(self.versions)
        if rest.startswith("/versions/"):
            v = rest[len("/versions/"):].split("/")[0].split(":")[0]
            rest = rest[len("/versions/") + len(v):]
            version = int(v)
            if version not in self.versions:
                return self._reply(h, 404, {"error": f"Servable not found for request: "
                                                     f"Specific({self.name}, {version})"})
        if raw is None and rest == "":
            return self._reply(h, 200, {"model_version_status": [
                {"version": str(v), "state": "AVAILABLE", "status": {"error_code": "OK"}}
                for v in sorted(self.versions)]})
        if raw is None and rest == "/metadata":
            sig = self._sig(version)
            return self._reply(h, 200, {"model_spec": {"name": self.name, "version": str(version)},
                                        "metadata": {"signature_def": {"inputs": sorted(
                                            sig.structured_input_signature[1])}}})
        if raw is not None and rest == ":predict":
            body = json.loads(raw)
            try:
                sig = self._sig(version, body.get("signature_name", "serving_default"))
            except KeyError as e:
                return self._reply(h, 400, {"error": f"signature not found: {e}"})
            names = sorted(sig.structured_input_signature[1])
            try:
                tensors = decode_request(body, names)
                specs = sig.structured_input_signature[1]  # TF Serving decodes by dtype
                out = sig(**{k: tf.cast(tf.constant(v), specs[k].dtype)
                             for k, v in tensors.items()})
            except (ValueError, KeyError, tf.errors.InvalidArgumentError) as e:
                msg = getattr(e, "message", str(e))
                return self._reply(h, 400, {"error": msg})
            return self._reply(h, 200, encode_reply({k: v.numpy() for k, v in out.items()},
                                                    "instances" in body))
        return self._reply(h, 404, {"error": f"unknown path {path}"})


class FakeGrpcServing:
    """TF Serving's gRPC PredictionService (Predict, GetModelMetadata) and ModelService
    (GetModelStatus) over SavedModel versions, on 127.0.0.1, for tests; the messages are
    tensorflow-serving-api's own. `delay` seconds before each answer; `fail` a
    (grpc.StatusCode, details) to answer instead; `unavailable_next` answers UNAVAILABLE
    that many times first."""

    def __init__(self, name="gpicl", versions=None):
        from concurrent import futures

        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.name, self.versions = name, versions or {}
        self.delay, self.fail, self.unavailable_next, self.requests = 0.0, None, 0, []
        self._loaded = {}
        outer = self

        class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                return outer._predict(request, context)

            def GetModelMetadata(self, request, context):
                return outer._metadata(request, context)

        class Models(model_service_pb2_grpc.ModelServiceServicer):
            def GetModelStatus(self, request, context):
                return outer._status(request, context)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Prediction(),
                                                                           self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(Models(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *a):
        self.server.stop(None)

    def _version(self, spec, context):
        import grpc

        self.requests.append(spec.signature_name)
        if self.unavailable_next > 0:
            self.unavailable_next -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is restarting")
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            context.abort(*self.fail)
        v = spec.version.value if spec.HasField("version") else max(self.versions)
        if spec.name != self.name or v not in self.versions:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Servable not found for request: Specific({spec.name}, {v})")
        return v

    def _signatures(self, v):
        import tensorflow as tf

        if v not in self._loaded:
            self._loaded[v] = tf.saved_model.load(self.versions[v]).signatures
        return self._loaded[v]

    def _predict(self, request, context):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        v = self._version(request.model_spec, context)
        name = request.model_spec.signature_name or "serving_default"
        sigs = self._signatures(v)
        if name not in sigs:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"Serving signature name: \"{name}\" not found in signature def")
        try:
            out = sigs[name](**{k: tf.constant(tf.make_ndarray(t))
                                for k, t in request.inputs.items()})
        except (TypeError, ValueError, tf.errors.InvalidArgumentError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, getattr(e, "message", str(e)))
        reply = predict_pb2.PredictResponse()
        reply.model_spec.name, reply.model_spec.version.value = self.name, v
        reply.model_spec.signature_name = name
        for k, t in out.items():
            reply.outputs[k].CopyFrom(tf.make_tensor_proto(t.numpy()))
        return reply

    def _metadata(self, request, context):
        from tensorflow_serving.apis import get_model_metadata_pb2

        v = self._version(request.model_spec, context)
        reply = get_model_metadata_pb2.GetModelMetadataResponse()
        reply.model_spec.name, reply.model_spec.version.value = self.name, v
        return reply

    def _status(self, request, context):
        from tensorflow_serving.apis import get_model_status_pb2

        self._version(request.model_spec, context)
        reply = get_model_status_pb2.GetModelStatusResponse()
        for v in sorted(self.versions):
            s = reply.model_version_status.add()
            s.version, s.state = v, get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return reply
