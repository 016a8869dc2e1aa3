"""Command lines: train_keras.py (gpicl-train), gpicl-export, gpicl-eval.

Each parses its flags and validates what it can before importing TensorFlow,
so `--help` and `--print-config` answer at once. A user error (a bad flag,
path, config or checkpoint) ends in one line `PROG: error: ...` and exit
status 2, before any file is written. TensorFlow's C++ start-up log is
silenced (set GPICL_TF_LOGS=1 to see it).
"""

from __future__ import annotations

import argparse
import os
import sys

from gpicl_tf.config import PRESETS, apply_overrides, check_name, get_preset
from gpicl_tf.files import check_dir_arg
from gpicl_tf.tfserving import SERVING_ROOT

def quiet_tensorflow() -> None:
    """Imports TensorFlow with its C++ start-up log (oneDNN, CUDA probes) silenced."""
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # also hides the CUDA probe's cuInit error
    if "tensorflow" in sys.modules or os.environ.get("GPICL_TF_LOGS"):
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        # Import only: initialising devices here would be too early for
        # MultiWorkerMirroredStrategy, which must configure them itself.
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run(prog: str, fn, argv) -> int:
    """Runs fn(argv); a ValueError (user error) becomes `prog: error: ...`, exit 2."""
    try:
        return fn(argv) or 0
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def int_list(flag: str, text: str, low: int = 0) -> list:
    """"1,2,4" -> [1, 2, 4]; anything else is a ValueError naming the flag."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < low:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers >= {low}")
    return values


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def positive_int(flag: str, most=None):
    """argparse type: an integer >= 1 (and <= most), named in the error."""
    want = "an integer >= 1" + (f" and <= {most}" if most else "")

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if v < 1 or (most and v > most):
            raise argparse.ArgumentTypeError(f"expected {want}, got {v}")
        return v

    parse.__name__ = flag
    return parse


# ---------------------------------------------------------------- training
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_keras.py",
        description="Meta-train a transformer to learn in context (Kirsch et al. 2022), "
                    "export it as a SavedModel for TF Serving, and report its MSE on "
                    "unseen tasks beside k-NN and GP regression. Rerunning the same "
                    "command resumes from the last checkpoint; rerunning a finished run "
                    "prints its figures and trains nothing.")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="named config: tiny (tests, seconds), default (CPU main job, "
                        "minutes: the general learner, inputs of width 1-8, the broad prior), "
                        "mlp1d (the paper's 1-D random-MLP setting), mix (mlp1d on half "
                        "random-MLP, half GP tasks), paper (GPUs, the paper's model size)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=int,
                   help="global batch in tasks per step, split over replicas (train.batch_size)")
    p.add_argument("--learning-rate", type=float, help="peak Adam learning rate")
    p.add_argument("--seed", type=int, help="seed of the task stream and initialisation")
    p.add_argument("--n-tasks", type=str,
                   help="number of distinct training functions: an integer T, or 'none' "
                        "for a fresh function per example (task.n_tasks)")
    p.add_argument("--model-name", default=None,
                   help="run and export name (default: the preset's name: gpicl for "
                        "default, tiny, gpicl-mlp1d, gpicl-mix, gpicl-paper)")
    p.add_argument("--logdir", help="TensorBoard + checkpoint directory "
                                    "(default: runs/<model-name>)")
    p.add_argument("--export-dir", default="exports",
                   help="SavedModels go to <export-dir>/<model-name>/<version>/")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set model.d_model=128 "
                        "--set task.mlp_hidden=32,32 (repeatable)")
    p.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    p.add_argument("--no-report", action="store_true",
                   help="skip the short evaluation against k-NN and GP regression "
                        "(seconds for tiny, about a minute for default)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")
    return p


def resolve_config(args):
    overrides = [f"name={args.model_name}"] if args.model_name is not None else []
    for flag, key in (("steps", "train.steps"), ("batch_size", "train.batch_size"),
                      ("learning_rate", "train.learning_rate"), ("seed", "train.seed"),
                      ("n_tasks", "task.n_tasks")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return apply_overrides(get_preset(args.preset), overrides + list(args.set))


def short_evaluation(trainer, cfg, export_path, out, logdir) -> None:
    """The main job's report: the evaluation of gpicl-eval on a few suites.

    Runs through the export's serving_default when there is one (what TF
    Serving runs), else through the Keras model.
    """
    from gpicl_tf import evaluate

    if cfg.task.kind == "classification":
        from gpicl_tf import evaluate_classification as ec

        print("\nShort evaluation on datasets it never saw (full table: gpicl-eval --model "
              f"{os.path.dirname(export_path) if export_path else 'exports/NAME'} --out {out}):")
        ec.short_report(ec.saved_model_classify_fn(export_path) if export_path
                        else ec.keras_classify_fn(trainer.model, cfg), cfg, out,
                        jobs=available_cores())
        return
    predict = (evaluate.saved_model_predict_fn(export_path) if export_path
               else evaluate.keras_predict_fn(trainer.model))
    # the training family, 1-D transfer, and (for a model of width >= 4) a noisy Garg suite
    wanted = {cfg.task.family, "random_mlp", "sine", "gp_rbf_l0.5", "garg_tree_d4_noisy"}
    suites = [s for s in evaluate.default_suites(cfg) if s.name in wanted]
    ks = [k for k in (4, 16, 32) if k <= cfg.task.context_max]
    print(f"\nShort evaluation on unseen tasks (full suite: gpicl-eval --model "
          f"{os.path.dirname(export_path) if export_path else 'exports/NAME'} --out {out}):")
    dist = evaluate.saved_model_dist_fn(export_path) if export_path else None  # bar head
    results = evaluate.evaluate(predict, cfg, suites, ks, baselines=("knn", "gp"), n_tasks=128,
                                dist_fn=dist, jobs=available_cores())
    evaluate.write_outputs(results, out, predict, cfg, suites, logdir=os.path.join(logdir, "eval"),
                           dist_fn=dist)
    print(evaluate.markdown(results))
    if dist is not None:
        for metric in ("nll", "cover90"):
            print("\n" + evaluate.markdown(results, metric))
    print(f"report: {out}/results.md, {out}/mse_vs_k.png"
          + (f", {out}/calibration.png" if dist is not None else ""))


def _train(argv) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    logdir = args.logdir or os.path.join("runs", cfg.name)
    check_dir_arg("--logdir", logdir)
    check_dir_arg("--export-dir", args.export_dir)
    check_dir_arg("--export-dir/--model-name", os.path.join(args.export_dir, cfg.name))
    quiet_tensorflow()
    from gpicl_tf import export
    from gpicl_tf.train import Trainer, TrainingDiverged, WorkerFailure

    trainer = Trainer(cfg, logdir)
    try:
        result = trainer.train()
    except (TrainingDiverged, WorkerFailure) as e:
        print(f"train_keras.py: error: {e}", file=sys.stderr)
        return 1
    if result.complete:
        print(f"\nthe run in {logdir} is complete: {result.step} steps; final loss "
              f"{result.final_loss:.4f}, unseen-task loss {result.eval_loss:.4f} "
              "(nothing trained; use another --logdir or --model-name to train anew)")
    else:
        print(f"\ntrained {result.step} steps (resumed from {result.resumed_from}); "
              f"loss {result.final_loss:.4f}, unseen-task loss {result.eval_loss:.4f}")
    if not trainer.chief:
        return 0
    path = None
    if not args.no_export:
        path = export.export_if_changed(trainer.model, cfg, args.export_dir, result.step,
                                        os.path.abspath(logdir))
        export_dir = os.path.abspath(args.export_dir)
        print(f"SavedModel: {path}  (serve every model of {args.export_dir}: docker run -p "
              f"8500:8500 -p 8501:8501 -v {export_dir}:/models tensorflow/serving "
              "--model_config_file=/models/models.config --enable_model_warmup)")
    report_dir = os.path.join("reports", cfg.name)
    if result.complete and os.path.exists(os.path.join(report_dir, "results.md")):
        print(f"report (unchanged): {report_dir}/results.md")
    elif not args.no_report:
        if cfg.task.x_dim_min == 1 and cfg.task.kind == "regression":
            from gpicl_tf.evaluate import prediction_figure

            fig_path = os.path.join(logdir, "predictions.png")
            prediction_figure(trainer.model, cfg, n_tasks=4).savefig(fig_path, dpi=100)
            print(f"picture of predictions on unseen tasks: {fig_path}")
        short_evaluation(trainer, cfg, path, report_dir, logdir)
    print(f"\nTensorBoard: tensorboard --logdir {logdir}")
    return 0


def main(argv=None) -> int:
    """train_keras.py / gpicl-train."""
    return run("train_keras.py", _train, argv)


# ------------------------------------------------------------------ export
def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpicl-export",
                                description="Export a training checkpoint as a SavedModel "
                                            "in TF Serving's layout.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--logdir", help="run directory (config.json, checkpoints/)")
    src.add_argument("--pretrained", choices=["regressor", "classifier"],
                     help="export a model that comes with the package (no training)")
    p.add_argument("--export-dir", default="exports", help="parent of the model base folder")
    p.add_argument("--serving-root", default=SERVING_ROOT,
                   help="where TF Serving sees --export-dir (models.config's base paths; "
                        "default /models, the README's docker mount)")
    p.add_argument("--model-name", default=None,
                   help="model folder name: letters, digits, '-' and '_' (default: the "
                        "run's config name)")
    p.add_argument("--recalibrate", action="store_true",
                   help="a bar-head run: fit the head's recalibration per context size "
                        "(model.recalibrate) on the run's weights and export with it; the "
                        "run folder is not changed")
    p.add_argument("--recalibrate-width", action="store_true",
                   help="with --recalibrate: one map per context size and input-width group "
                        "(model.recalibrate_width)")
    p.add_argument("--xla", action="store_true",
                   help="XLA-compile the signatures (lower CPU latency; TF Serving on CPU "
                        "then needs --xla_cpu_compilation_enabled=true)")
    return p


def _export(argv) -> int:
    a = export_parser().parse_args(argv)
    if a.model_name is not None:
        check_name(a.model_name, "--model-name")
    check_dir_arg("--export-dir", a.export_dir)
    if not a.serving_root.startswith("/"):
        raise ValueError(f"--serving-root {a.serving_root!r}: expected an absolute path "
                         "(where the server sees --export-dir, e.g. /models)")
    if a.recalibrate_width and not a.recalibrate:
        raise ValueError("--recalibrate-width: the maps per input width are a kind of "
                         "recalibration; add --recalibrate")
    quiet_tensorflow()
    if a.pretrained:
        if a.recalibrate:
            raise ValueError("--recalibrate: the shipped models come as they are; export a "
                             "bar-head run with --logdir to recalibrate it")
        if a.xla:
            raise ValueError("--xla: the shipped models are plain exports; export a run "
                             "with --logdir to compile one with XLA")
        from gpicl_tf.pretrained import export_pretrained

        out = export_pretrained(a.pretrained, a.export_dir, a.model_name, a.serving_root)
        print(f"exported the shipped {a.pretrained} to {out}; "
              f"{os.path.join(a.export_dir, 'models.config')} names it")
        return 0
    check_dir_arg("--logdir", a.logdir)
    from gpicl_tf.export import export_checkpoint

    export_checkpoint(a.logdir, a.export_dir, a.model_name, a.xla, a.serving_root,
                      recalibrate=a.recalibrate, recalibrate_width=a.recalibrate_width)
    return 0


def export_main(argv=None) -> int:
    """gpicl-export."""
    return run("gpicl-export", _export, argv)


# -------------------------------------------------------------- evaluation
MAX_TASK_POINTS = 1024  # gp_rbf tasks factor an N x N kernel matrix per task


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpicl-eval",
        description="Transfer evaluation of an exported model against per-task learners, "
                    "every method on the same tasks.")
    p.add_argument("--model", required=True, help="export base folder, e.g. exports/gpicl")
    p.add_argument("--version", type=int, help="version to evaluate (default: the highest)")
    p.add_argument("--out", required=True, help="output folder, e.g. reports/gpicl")
    p.add_argument("--suites", default="all", help="comma-separated suite names (default: all; "
                                                   "regression models)")
    p.add_argument("--datasets", default=None,
                   help="classification models: comma-separated transfer datasets (default: "
                        "iris,wine,breast_cancer,digits_test; with --data-dir also mnist, "
                        "fashion_mnist, kmnist, cifar10, svhn_cropped)")
    p.add_argument("--data-dir", default=None,
                   help="classification models: where tensorflow-datasets datasets are prepared")
    p.add_argument("--ks", default=None, help="context sizes, e.g. 1,2,4,8 "
                                              "(default: 1..64 up to what the model supports; "
                                              "classification: examples per class, 1,5,10,25)")
    p.add_argument("--baselines", default=None,
                   help="comma-separated per-task learners (default: mean,knn,ridge,"
                        "poly_ridge,gp; add mlp for the slow per-task MLP; classification: "
                        "sgd,logreg,knn,random_forest,gbt)")
    p.add_argument("--tasks", type=positive_int("--tasks"), default=None,
                   help="tasks per suite and k (default 128; classification 32); every "
                        "method runs on the same tasks")
    p.add_argument("--queries", type=positive_int("--queries"), default=None,
                   help="query points per task (default 16; classification 64)")
    p.add_argument("--task-points", type=positive_int("--task-points", MAX_TASK_POINTS),
                   default=None,
                   help="regression models: draw each task with this many points (at least k + "
                        "queries) and score its first queries, so the tasks are those a preset's "
                        "training draws (its task.n_points, 48 for default: a standardised "
                        "family's y are standardised over all of them). Default: k + queries, "
                        "the tasks of the committed results files")
    p.add_argument("--n-permutations", type=positive_int("--n-permutations"), default=1,
                   help="classification models: also score the estimator's ensemble of this "
                        "many members (column orders and class ids), as method model_x<K>")
    cores = available_cores()
    p.add_argument("--jobs", type=positive_int("--jobs"), default=cores,
                   help="worker processes that fit the per-task baselines (default: the "
                        f"cores this process may use, {cores} here); the results are the "
                        "same for every value")
    p.add_argument("--logdir", help="also write scalars and images to TensorBoard here")
    return p


def eval_main(argv=None) -> int:
    """gpicl-eval."""
    return run("gpicl-eval", _eval, argv)


def _eval(argv) -> int:
    a = eval_parser().parse_args(argv)
    check_dir_arg("--out", a.out)
    ks = int_list("--ks", a.ks) if a.ks else None
    quiet_tensorflow()
    from gpicl_tf import evaluate
    from gpicl_tf.export import load_config, resolve_version

    if load_config(resolve_version(a.model, a.version)).task.kind == "classification":
        from gpicl_tf import evaluate_classification

        if a.task_points is not None:
            raise ValueError(f"--task-points {a.task_points}: for regression models; a "
                             "classification model's tasks come from its datasets")
        return evaluate_classification.run_cli(a, ks)
    if a.n_permutations != 1:
        raise ValueError(f"--n-permutations {a.n_permutations}: expected 1 for a regression "
                         "model (the ensemble is scored for classification models)")
    a.tasks, a.queries = a.tasks or 128, a.queries or 16
    return evaluate.run_cli(a, ks)


# -------------------------------------------------------------- experiments
def experiment_main(argv=None) -> int:
    """gpicl-experiment."""
    from gpicl_tf.experiments import runner

    return runner.main(argv)


if __name__ == "__main__":
    sys.exit(main())
