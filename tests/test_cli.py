"""Run folders, presets and command lines (issue 10, items 3-5, 8, 9, 13, 16, 17)."""

import configparser
import os
import shutil
import time

import pytest

from conftest import REPO, run_python
from gpicl_tf.config import apply_overrides, get_preset, unseen_task_config

TRAIN = os.path.join(REPO, "train_keras.py")


def _cli(args, env=None, **kw):
    """Runs a command line as a user's shell would: TF_CPP_MIN_LOG_LEVEL unset."""
    return run_python(args, env={"TF_CPP_MIN_LOG_LEVEL": "", **(env or {})}, **kw)


def _train(tmp, *args, check=True):
    return _cli([TRAIN, "--preset", "tiny", "--steps", "10", "--no-report",
                       "--logdir", str(tmp / "run"), "--export-dir", str(tmp / "ex"), *args],
                      check=check)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 10-step tiny run (its run/ and ex/ folders) and its training's process
    (what it printed), trained once per test worker; each test gets its own copy
    (`_finished`)."""
    base = tmp_path_factory.mktemp("finished")
    return base, _train(base)


def _finished(tmp, finished_run):
    """Copies the finished run into tmp (as _train(tmp) would have left it)."""
    base, _ = finished_run
    for name in ("run", "ex"):
        shutil.copytree(base / name, tmp / name)


def _snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def test_a_mismatched_resume_without_config_json_changes_nothing(tmp_path, finished_run):
    _finished(tmp_path, finished_run)
    os.remove(tmp_path / "run" / "config.json")
    before = _snapshot(tmp_path / "run")
    proc = _train(tmp_path, "--set", "model.d_model=48", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot be restored into this model" in proc.stderr
    assert _snapshot(tmp_path / "run") == before  # config.json was not rewritten


@pytest.mark.parametrize("flag,field", [(["--set", "model.n_layers=3"], "model.n_layers"),
                                        (["--seed", "7"], "train.seed"),
                                        (["--steps", "20"], "train.steps")])
def test_a_mismatched_resume_names_only_the_fields_that_differ(tmp_path, flag, field,
                                                              finished_run):
    _finished(tmp_path, finished_run)
    before = _snapshot(tmp_path / "run")
    proc = _train(tmp_path, *flag, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and f"Differs: {field}: stored" in err
    assert "TaskConfig(" not in err  # no dump of both configs
    assert _snapshot(tmp_path / "run") == before


def test_rerunning_a_finished_run_prints_its_figures_and_writes_nothing(tmp_path):
    # trained in place: an export records its run folder, so a copied run exports anew
    first = _train(tmp_path).stdout
    loss = first.split("loss ", 1)[1].split(",")[0]
    before = _snapshot(tmp_path)
    out = _train(tmp_path).stdout
    assert "is complete: 10 steps" in out and f"final loss {loss}" in out
    assert "nan" not in out
    assert _snapshot(tmp_path) == before  # no new export version, no new events
    assert sorted(os.listdir(tmp_path / "ex" / "tiny")) == ["1"]


def test_a_copied_finished_run_trains_nothing_but_exports_once_more(tmp_path, finished_run):
    """A finished run folder copied elsewhere: run again it trains nothing, and exports a
    second version, since the first records the run folder it came from (README)."""
    _finished(tmp_path, finished_run)
    weights = _snapshot(tmp_path / "run" / "checkpoints")
    out = _train(tmp_path).stdout
    assert "is complete: 10 steps" in out
    assert sorted(os.listdir(tmp_path / "ex" / "tiny")) == ["1", "2"]
    assert _snapshot(tmp_path / "run" / "checkpoints") == weights
    _train(tmp_path)  # and then, in its new folder, nothing more
    assert sorted(os.listdir(tmp_path / "ex" / "tiny")) == ["1", "2"]


def test_presets_name_their_runs_and_exports(tmp_path):
    _cli([TRAIN, "--preset", "tiny", "--steps", "5", "--no-report"], cwd=str(tmp_path))
    assert os.path.isdir(tmp_path / "runs" / "tiny" / "checkpoints")
    assert os.listdir(tmp_path / "exports" / "tiny") == ["1"]
    assert not os.path.exists(tmp_path / "exports" / "gpicl")
    names = {p: get_preset(p).name for p in ("tiny", "default", "classify", "mlp1d", "mix",
                                             "paper")}
    assert names == {"tiny": "tiny", "default": "gpicl", "classify": "gpicl-classify",
                     "mlp1d": "gpicl-mlp1d", "mix": "gpicl-mix", "paper": "gpicl-paper"}


@pytest.mark.parametrize("args,message", [
    (["--steps", "10000000000000"], "train.steps=10000000000000 is invalid"),
    (["--batch-size", "12"], "train.batch_size=12 is invalid: expected a multiple of"),
    (["--model-name", "../x"], "name='../x' is invalid"),
])
def test_user_errors_are_one_line_and_write_nothing(tmp_path, args, message):
    proc = _cli([TRAIN, "--preset", "tiny", "--no-report", *args], cwd=str(tmp_path),
                      check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("which", ["--logdir", "--export-dir"])
def test_a_directory_flag_that_is_a_file_fails_before_training(tmp_path, which):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    args = {"--logdir": str(tmp_path / "run"), "--export-dir": str(tmp_path / "ex")}
    args[which] = str(afile)
    tic = time.time()
    proc = _cli([TRAIN, "--preset", "tiny", "--no-report", "--logdir", args["--logdir"],
                       "--export-dir", args["--export-dir"]], check=False)
    assert proc.returncode == 2 and f"{which} '{afile}' is a file" in proc.stderr
    assert afile.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["afile"]
    assert time.time() - tic < 20  # refused before any training


def test_invalid_tf_config_truncated_checkpoint_and_bad_config_json(tmp_path, finished_run):
    proc = _cli([TRAIN, "--preset", "tiny", "--logdir", str(tmp_path / "r0")],
                      env={"TF_CONFIG": "{not json"}, check=False)
    assert proc.returncode == 2 and "TF_CONFIG is not valid JSON" in proc.stderr
    assert not os.path.exists(tmp_path / "r0")
    _finished(tmp_path, finished_run)
    ckpt = tmp_path / "run" / "checkpoints"
    data = [f for f in os.listdir(ckpt) if ".data-" in f][0]
    with open(ckpt / data, "r+b") as f:
        f.truncate(100)
    proc = _train(tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot be restored" in proc.stderr and "ckpt-10" in proc.stderr
    (tmp_path / "run" / "config.json").write_text("{broken")
    proc = _train(tmp_path, check=False)
    assert proc.returncode == 2 and "config.json is not a valid gpicl_tf config" in proc.stderr


def test_biased_fraction_is_validated_and_never_reaches_unseen_tasks(tiny):
    cfg = apply_overrides(tiny, ["task.biased_fraction=0.25"])
    assert unseen_task_config(cfg.task).biased_fraction == 0.0
    assert unseen_task_config(cfg.task).n_tasks is None
    with pytest.raises(ValueError, match="biased_fraction=0.3 is invalid: expected a multiple "
                                         "of 1/block_size"):
        apply_overrides(tiny, ["task.biased_fraction=0.3"])
    with pytest.raises(ValueError, match=r"0 for families \['gp_rbf'\]"):
        apply_overrides(tiny, ["task.family=gp_rbf", "task.biased_fraction=0.25"])


def test_unseen_task_evaluations_never_contain_the_biased_task(tiny, tmp_path):
    import numpy as np

    from gpicl_tf import data as data_lib
    from gpicl_tf.evaluate import context_batch
    from gpicl_tf.train import Trainer

    cfg = apply_overrides(tiny, ["task.biased_fraction=0.5"])
    fixed = data_lib.sample_batch(cfg.task, cfg.train.seed, 8, stream=data_lib.EVAL_STREAM)
    assert (fixed["task_id"].numpy() == -2).sum() == 4  # the training stream has it
    batch = Trainer(cfg, str(tmp_path / "r")).eval_batch()
    assert (batch["task_id"].numpy() != -2).all()
    x, y, _ = context_batch(cfg, 4, 16, 4, seed=0)
    # Had the fixed task leaked, several of these would share one function.
    assert len({np.round(row[:, 0], 5).tobytes() for row in y}) == 16


def test_batch_size_settings_are_validated_before_the_sweep_starts(tmp_path, capsys):
    from gpicl_tf.experiments import runner

    out = str(tmp_path / "sweep")
    assert runner.main(["batch-size", "--family", "random_mlp", "--preset", "tiny",
                        "--batch-sizes", "16,12", "--out", out]) == 2
    assert "train.batch_size=12 is invalid" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert runner.main(["biased-tasks", "--fractions", "abc", "--out", out]) == 2
    assert "--fractions 'abc': expected comma-separated numbers" in capsys.readouterr().err


@pytest.mark.parametrize("call", [
    "main(['--help'])", "main(['--print-config'])", "export_main(['--help'])",
    "eval_main(['--help'])", "experiment_main(['--help'])"])
def test_help_and_print_config_answer_without_tensorflow(call):
    # What train_keras.py and the gpicl-export/-eval/-experiment console scripts run.
    code = ("import sys\nfrom gpicl_tf.cli import *\ntry:\n    " + call +
            "\nexcept SystemExit:\n    pass\n"
            "print('TF_IMPORTED', 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    tic = time.time()
    proc = run_python(code)
    assert "TF_IMPORTED False False" in proc.stdout, proc.stdout[-500:]
    assert "usage:" in proc.stdout or '"task"' in proc.stdout
    assert time.time() - tic < 15


def test_the_cli_silences_tensorflow_start_up_logs_and_writes_plain_progress_lines(
        finished_run):
    proc = finished_run[1]  # a 10-step training's output
    assert "cuInit" not in proc.stderr and "oneDNN" not in proc.stderr
    assert "\x1b[" not in proc.stdout and "\b" not in proc.stdout  # not a terminal
    assert "step 10/10 (100%)" in proc.stdout


def test_every_cli_flag_has_a_help_text():
    from gpicl_tf import cli

    for parser in (cli.build_parser(), cli.export_parser(), cli.eval_parser()):
        for action in parser._actions:
            assert action.help, (parser.prog, action.dest)


def test_dependency_floors_match_what_the_code_uses():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    reqs = cfg["options"]["install_requires"]
    assert "scikit-learn>=1.6" in reqs  # sklearn.utils.validation.validate_data is 1.6+
    from sklearn.utils.validation import validate_data  # noqa: F401
