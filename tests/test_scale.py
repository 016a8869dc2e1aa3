"""Multi-worker training on 127.0.0.1, collective timeouts, bfloat16, GPU tests."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_workers(tmp, steps, timeout=15, extra=(), chief=False, logdirs=("run", "run")):
    ports = _free_ports(2)
    addr = [f"127.0.0.1:{p}" for p in ports]
    if chief:  # a chief plus one worker: one cluster of two tasks
        cluster = {"chief": addr[:1], "worker": addr[1:]}
        tasks = [("chief", 0), ("worker", 0)]
    else:
        cluster = {"worker": addr}
        tasks = [("worker", 0), ("worker", 1)]
    procs, logs = [], []
    for i, (kind, index) in enumerate(tasks):
        env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2",
               "GPICL_COLLECTIVE_TIMEOUT": str(timeout),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind,
                                                                      "index": index}})}
        log = open(os.path.join(tmp, f"w{i}.log"), "w")
        cmd = [sys.executable, os.path.join(REPO, "train_keras.py"), "--preset", "tiny",
               "--steps", str(steps), "--logdir", os.path.join(tmp, logdirs[i]), "--export-dir",
               os.path.join(tmp, "ex"), "--no-report", "--set", "train.log_every=5", *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs


def _weights(ckpt_dir):
    r = tf.train.load_checkpoint(tf.train.latest_checkpoint(ckpt_dir))
    # Model weights, Adam moments and the step: everything the checkpoint holds.
    names = sorted(n for n in r.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH")
    return {n: r.get_tensor(n) for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("with_chief", [False, True], ids=["two-workers", "chief+worker"])
def test_two_workers_train_identically_and_only_the_chief_exports(tmp_path, with_chief):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    procs, logs = _start_workers(str(tmp_path), steps=40, chief=with_chief)
    codes = [p.wait(timeout=600) for p in procs]
    for log in logs:
        log.close()
    assert codes == [0, 0], open(tmp_path / "w0.log").read()[-3000:]
    chief = _weights(str(tmp_path / "run" / "checkpoints"))
    scratch = "worker_0" if with_chief else "worker_1"
    other = _weights(str(tmp_path / "run" / "workers" / scratch / "checkpoints"))
    assert chief.keys() == other.keys() and len(chief) > 10
    for k in chief:
        np.testing.assert_array_equal(chief[k], other[k])
    assert os.listdir(tmp_path / "ex" / "tiny") == ["1"]  # one export, by the chief
    assert not glob.glob(str(tmp_path / "run" / "workers" / "*" / "events*"))
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    acc.Reload()
    losses = [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def test_workers_that_restored_different_steps_fail_fast(tmp_path):
    # No shared filesystem: the chief finds a checkpoint at step 20, the worker none.
    subprocess.run([sys.executable, os.path.join(REPO, "train_keras.py"), "--preset", "tiny",
                    "--steps", "20", "--logdir", str(tmp_path / "a"), "--no-export",
                    "--no-report"], env={**os.environ, "PYTHONPATH": REPO}, check=True,
                   capture_output=True, timeout=300)
    procs, logs = _start_workers(str(tmp_path), steps=20, logdirs=("a", "b"))
    codes = [p.wait(timeout=300) for p in procs]
    for log in logs:
        log.close()
    text = open(tmp_path / "w0.log").read()
    assert codes == [1, 1], text[-2000:]
    assert "workers restored different steps (from 0 to 20" in text
    assert "Traceback" not in text
    assert not os.path.exists(tmp_path / "ex")


@pytest.mark.slow
def test_killing_a_worker_stops_the_other_with_a_collective_timeout_error(tmp_path):
    procs, logs = _start_workers(str(tmp_path), steps=100000, timeout=10)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training runs
        if "steps/s" in open(tmp_path / "w0.log").read():
            break
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    tic = time.time()
    code = procs[0].wait(timeout=120)
    waited = time.time() - tic
    for log in logs:
        log.close()
    out = open(tmp_path / "w0.log").read()
    assert code == 1
    assert "collective timeout 10 s" in out and "peer worker died" in out, out[-3000:]
    assert waited < 10 + 20, waited


def test_bfloat16_trains_on_cpu_and_exports_float32_signatures(tmp_path):
    import keras

    from gpicl_tf.config import apply_overrides, get_preset
    from gpicl_tf.export import export_model
    from gpicl_tf.train import Trainer

    cfg = apply_overrides(get_preset("tiny"), ["train.precision=mixed_bfloat16",
                                               "train.steps=60"])
    try:
        t = Trainer(cfg, str(tmp_path / "run"), strategy=tf.distribute.get_strategy())
        assert t.model.get_layer("block_0").compute_dtype == "bfloat16"
        assert t.model.get_layer("head").compute_dtype == "float32"
        from gpicl_tf.train import run_steps

        losses = run_steps(t, 12, 5)
        assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
        path = export_model(t.model, cfg, str(tmp_path / "ex"), "bf16")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    sig = tf.saved_model.load(path).signatures["serving_default"]
    specs = sig.structured_input_signature[1]
    assert {k: v.dtype for k, v in specs.items()} == {
        "context_x": tf.float32, "context_y": tf.float32, "query_x": tf.float32}
    out = sig(context_x=tf.zeros([1, 4, 1]), context_y=tf.ones([1, 4, 1]),
              query_x=tf.zeros([1, 2, 1]))
    assert out["mean"].dtype == tf.float32 and out["mean"].shape == (1, 2, 1)


def _has_gpu():
    out = subprocess.run([sys.executable, "-c", "import tensorflow as tf; "
                          "print(len(tf.config.list_physical_devices('GPU')))"],
                         capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"})
    return out.stdout.strip().endswith(("1", "2", "3", "4", "5", "6", "7", "8"))


@pytest.mark.gpu
def test_gpu_mirrored_training_runs_and_matches_cpu_loss_scale():
    if not _has_gpu():
        pytest.skip("no GPU on this machine")
    code = """
import tensorflow as tf, tempfile
from gpicl_tf.config import get_preset, apply_overrides
from gpicl_tf.train import Trainer, select_strategy, run_steps
cfg = apply_overrides(get_preset("tiny"), ["train.precision=mixed_bfloat16"])
s = select_strategy()
assert isinstance(s, tf.distribute.MirroredStrategy), s
t = Trainer(cfg, tempfile.mkdtemp(), strategy=s)
l = run_steps(t, 10, 5)
assert l[-1] < l[0], l
print("OK", s.num_replicas_in_sync, l[0], l[-1])
"""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": REPO}, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
