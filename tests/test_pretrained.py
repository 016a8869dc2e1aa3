"""The models that come with the package (issue 7/7): predictions with no network and no
training, checksums recorded by their training command, gpicl-export --pretrained."""

import os
import shutil

import numpy as np
import pytest

from conftest import run_python, two_phase_presets
from gpicl_tf import pretrained
from gpicl_tf.config import get_preset

# What the gpicl-export console script runs.
EXPORT = ["-c", "import sys; from gpicl_tf.cli import export_main; "
          "sys.exit(export_main(sys.argv[1:]))"]

# Any connection but loopback fails, as on a machine without network.
NO_NETWORK = """import socket
_connect = socket.socket.connect
def connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
        raise OSError(f"network disabled in this test: {address}")
    return _connect(self, address)
socket.socket.connect = connect
socket.create_connection = lambda *a, **k: (_ for _ in ()).throw(OSError("network disabled"))
"""


@pytest.mark.parametrize("kind", sorted(pretrained.KINDS))
def test_the_shipped_models_checksums_match_what_their_training_command_recorded(kind):
    path = pretrained.folder(kind)
    info = pretrained.manifest(kind)
    assert info["command"] == f"python -m gpicl_tf.pretrained {kind}"
    assert pretrained.file_digests(path) == info["files"]
    assert pretrained.checksum(path) == info["sha256"]
    assert pretrained.size_bytes(path) - os.path.getsize(os.path.join(path, "manifest.json")) \
        == info["bytes"]
    # the model is the preset the command trains, for as many steps as it says, seeded
    from gpicl_tf.export import load_config

    cfg = get_preset(pretrained.KINDS[kind])
    assert load_config(path).to_dict() == cfg.to_dict()
    assert info["steps"] == cfg.train.steps and info["seed"] == cfg.train.seed
    assert np.isfinite(info["final_loss"]) and np.isfinite(info["eval_loss"])
    # every phase the command trained (the regressor: regressor_base, then regressor), in full
    chain = pretrained.phases(pretrained.KINDS[kind])
    assert [(p["preset"], p["steps"]) for p in info["phases"]] == [
        (p, get_preset(p).train.steps) for p in chain]
    assert all(np.isfinite(p["eval_loss"]) for p in info["phases"])


def test_a_changed_file_changes_the_checksum(tmp_path):
    src = pretrained.folder("regressor")
    copy = str(tmp_path / "copy")
    shutil.copytree(src, copy)
    assert pretrained.checksum(copy) == pretrained.manifest("regressor")["sha256"]
    with open(os.path.join(copy, "variables", "variables.data-00000-of-00001"), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert pretrained.checksum(copy) != pretrained.manifest("regressor")["sha256"]


def test_the_shipped_models_together_take_at_most_20_mb():
    total = sum(pretrained.size_bytes(pretrained.folder(k)) for k in pretrained.KINDS)
    assert total <= 20e6, total


def test_a_fresh_install_predicts_with_no_network_and_no_training(tmp_path):
    # In a new process, in an empty folder, with every non-loopback connection refused.
    out = run_python(NO_NETWORK + """
import os, numpy as np
from gpicl_tf import InContextClassifier, InContextRegressor
from sklearn.datasets import load_iris
rng = np.random.default_rng(0)
X = rng.normal(size=(80, 3))
y = 2.0 * X[:, 0] - X[:, 1] + 0.5 * X[:, 2] + 10.0
reg = InContextRegressor().fit(X[:60], y[:60])
pred = reg.predict(X[60:])
r2 = 1 - np.mean((pred - y[60:]) ** 2) / np.var(y[60:])
mean, std = reg.predict(X[60:], return_std=True)
Xi, yi = load_iris(return_X_y=True)
order = rng.permutation(len(yi))
clf = InContextClassifier().fit(Xi[order[:60]], yi[order[:60]])
acc = np.mean(clf.predict(Xi[order[60:]]) == yi[order[60:]])
print("R2", r2, "STD", float(np.median(std)), "ACC", acc, "FILES", sorted(os.listdir(".")))
""", cwd=str(tmp_path), timeout=300)
    words = out.stdout.split()
    r2, std, acc = (float(words[words.index(k) + 1]) for k in ("R2", "STD", "ACC"))
    assert r2 > 0.9, out.stdout        # a noise-free linear function of 3 features
    assert 0 < std < 1.0, out.stdout    # a distribution, narrow on a noise-free function
    assert acc > 0.85, out.stdout       # iris from 60 rows
    assert out.stdout.rstrip().endswith("FILES []")  # nothing trained, nothing written


def test_gpicl_export_pretrained_writes_tf_serving_layout_with_config_and_warmup(tmp_path):
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from gpicl_tf import InContextRegressor, tfserving

    exports = str(tmp_path / "exports")
    for _ in range(2):
        run_python(EXPORT + ["--pretrained", "regressor", "--export-dir", exports],
                   timeout=300)
    base = os.path.join(exports, "gpicl-regressor")
    assert sorted(os.listdir(base)) == ["1", "2"]
    assert len(tfserving.read_warmup(os.path.join(base, "2"))) > 1
    assert not os.path.exists(os.path.join(base, "2", "manifest.json"))
    config = model_server_config_pb2.ModelServerConfig()
    with open(os.path.join(exports, "models.config")) as f:
        text_format.Parse(f.read(), config)
    assert [(c.name, c.base_path) for c in config.model_config_list.config] == [
        ("gpicl-regressor", "/models/gpicl-regressor")]
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(30, 2)), rng.normal(size=30)
    a = InContextRegressor(base).fit(X[:20], y[:20]).predict(X[20:])
    b = InContextRegressor().fit(X[:20], y[:20]).predict(X[20:])
    np.testing.assert_array_equal(a, b)
    sig = tf.saved_model.load(os.path.join(base, "1")).signatures["serving_default"]
    assert {"mean", "std", "quantiles"} <= set(sig.structured_outputs)


def test_export_pretrained_errors_name_the_flag(tmp_path):
    out = run_python(EXPORT + ["--pretrained", "regressor", "--xla", "--export-dir",
                               str(tmp_path)], check=False)
    assert out.returncode != 0 and "--xla" in out.stderr and "Traceback" not in out.stderr
    out = run_python(EXPORT + ["--pretrained", "bogus"], check=False)
    assert out.returncode == 2 and "invalid choice: 'bogus'" in out.stderr
    assert os.listdir(tmp_path) == []


def test_the_readmes_shipped_model_snippet_runs_as_pasted(tmp_path):
    import re

    from conftest import REPO

    readme = open(os.path.join(REPO, "README.md")).read()
    code = re.search(r"```python\n(from sklearn.datasets import load_diabetes\n.*?)```",
                     readme, re.S).group(1)
    out = run_python(NO_NETWORK + code + "\nprint('SNIPPET_OK', mean.shape, std.shape, "
                     "bool((std > 0).all()), round(float(1 - ((mean - y[100:]) ** 2).mean() "
                     "/ y[100:].var()), 2) > 0.2)", cwd=str(tmp_path), timeout=300)
    assert "SNIPPET_OK (342,) (342,) True True" in out.stdout, out.stdout


def test_build_trains_every_phase_then_ships_the_last(tmp_path, monkeypatch):
    # A two-phase kind, as the regressor is: `tiny` (10 steps), then `tiny_long` from it.
    from gpicl_tf.export import load_config

    _, long = two_phase_presets(monkeypatch)
    monkeypatch.setitem(pretrained.KINDS, "regressor", "tiny_long")
    assert pretrained.phases("tiny_long") == ["tiny", "tiny_long"]
    assert pretrained.phases("classifier") == ["classifier"]
    runs, shipped = str(tmp_path / "runs"), str(tmp_path / "shipped")
    info = pretrained.build("regressor", runs, shipped)
    assert [(p["preset"], p["steps"]) for p in info["phases"]] == [("tiny", 10),
                                                                  ("tiny_long", 5)]
    assert info["steps"] == 5 and info["preset"] == "tiny_long"
    assert sorted(os.listdir(runs)) == ["tiny", "tiny-long"]
    path = os.path.join(shipped, "regressor")
    assert load_config(path).to_dict() == long.to_dict()
    assert pretrained.checksum(path) == info["sha256"]
    # Rerun: both phases are finished, so nothing is trained again: the same model (the
    # SavedModel's bytes name traced functions by a per-process counter, so they differ).
    again = pretrained.build("regressor", runs, str(tmp_path / "again"))
    assert again["phases"] == info["phases"]
    assert sorted(os.listdir(runs)) == ["tiny", "tiny-long"]
    from gpicl_tf import InContextRegressor

    X = np.random.default_rng(0).normal(size=(30, 1))
    a, b = (InContextRegressor(p).fit(X[:20], X[:20, 0] ** 2).predict(X[20:])
            for p in (path, os.path.join(str(tmp_path / "again"), "regressor")))
    np.testing.assert_array_equal(a, b)


def test_a_circle_of_phases_is_refused(monkeypatch):
    from gpicl_tf import config
    from gpicl_tf.config import apply_overrides

    monkeypatch.setitem(config.PRESETS, "tiny_b", config.PRESETS["tiny"])  # a name, first
    a = apply_overrides(get_preset("tiny"), ["train.init_from=tiny_b"])
    b = apply_overrides(get_preset("tiny"), ["name=b", "train.init_from=tiny"])
    monkeypatch.setitem(config.PRESETS, "tiny_b", lambda: b)
    monkeypatch.setitem(config.PRESETS, "tiny", lambda: a)
    with pytest.raises(ValueError, match=r"preset 'tiny'.*in a circle \(tiny <- tiny_b <- tiny"):
        pretrained.phases("tiny")


def test_a_run_folder_of_another_config_is_a_one_line_error_naming_runs_dir(tmp_path):
    from gpicl_tf.config import get_preset

    folder = tmp_path / "runs" / get_preset("regressor_base").name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(get_preset("tiny").to_json())
    out = run_python(["-m", "gpicl_tf.pretrained", "regressor", "--runs-dir",
                      str(tmp_path / "runs")], check=False, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "holds a run with another config" in out.stderr and "--runs-dir" in out.stderr
    assert os.listdir(folder) == ["config.json"]  # nothing written
