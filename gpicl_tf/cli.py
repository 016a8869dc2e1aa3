"""Command line of train_keras.py: flags -> config -> train -> export -> report."""

from __future__ import annotations

import argparse
import os
import sys

from gpicl_tf.config import PRESETS, apply_overrides, get_preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_keras.py",
        description="Meta-train a transformer to learn in context (Kirsch et al. 2022), "
                    "export it as a SavedModel for TF Serving, and report its MSE on "
                    "unseen tasks beside k-NN and GP regression. Rerunning the same "
                    "command resumes from the last checkpoint.")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="named config: tiny (tests, seconds), default (CPU main job, "
                        "minutes), mix (default on half random-MLP, half GP tasks), "
                        "paper (GPUs, the paper's model size)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=int,
                   help="global batch in tasks per step, split over replicas (train.batch_size)")
    p.add_argument("--learning-rate", type=float, help="peak Adam learning rate")
    p.add_argument("--seed", type=int, help="seed of the task stream and initialisation")
    p.add_argument("--n-tasks", type=str,
                   help="number of distinct training functions: an integer T, or 'none' "
                        "for a fresh function per example (task.n_tasks)")
    p.add_argument("--model-name", default="gpicl",
                   help="run and export name (default: gpicl)")
    p.add_argument("--logdir", help="TensorBoard + checkpoint directory "
                                    "(default: runs/<model-name>)")
    p.add_argument("--export-dir", default="exports",
                   help="SavedModels go to <export-dir>/<model-name>/<version>/")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set model.d_model=128 "
                        "--set task.mlp_hidden=32,32 (repeatable)")
    p.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    p.add_argument("--no-report", action="store_true", help="skip the baseline report")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")
    return p


def resolve_config(args):
    overrides = [f"name={args.model_name}"]
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
    from gpicl_tf.report import keras_predict_fn

    predict = (evaluate.saved_model_predict_fn(export_path) if export_path
               else keras_predict_fn(trainer.model))
    wanted = {cfg.task.family, "sine", "gp_rbf_l0.5"}
    suites = [s for s in evaluate.default_suites(cfg) if s.name in wanted]
    ks = [k for k in (4, 16, 32) if k <= cfg.task.context_max]
    print(f"\nShort evaluation on unseen tasks (full suite: gpicl-eval --model "
          f"{os.path.dirname(export_path) if export_path else 'exports/NAME'} --out {out}):")
    results = evaluate.evaluate(predict, cfg, suites, ks, baselines=("knn", "gp"),
                                n_tasks=128, slow_tasks=128)
    evaluate.write_outputs(results, out, predict, cfg, suites, logdir=os.path.join(logdir, "eval"))
    print(evaluate.markdown(results))
    print(f"report: {out}/results.md, {out}/mse_vs_k.png")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ValueError as e:
        print(f"train_keras.py: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    from gpicl_tf import export
    from gpicl_tf.train import Trainer, TrainingDiverged, WorkerFailure

    logdir = args.logdir or os.path.join("runs", cfg.name)
    trainer = Trainer(cfg, logdir)
    try:
        result = trainer.train()
    except (TrainingDiverged, WorkerFailure) as e:
        print(f"train_keras.py: error: {e}", file=sys.stderr)
        return 1
    print(f"\ntrained {result.step} steps (resumed from {result.resumed_from}); "
          f"loss {result.final_loss:.4f}, unseen-task loss {result.eval_loss:.4f}")
    if not trainer.chief:
        return 0
    if not args.no_export:
        path = export.export_model(trainer.model, cfg, args.export_dir, cfg.name)
        print(f"SavedModel: {path}  (serve: docker run -p 8501:8501 -v "
              f"{os.path.abspath(os.path.dirname(path))}:/models/{cfg.name} -e MODEL_NAME={cfg.name} "
              "tensorflow/serving)")
    if cfg.task.x_dim == 1:
        from gpicl_tf.summaries import prediction_figure

        fig_path = os.path.join(logdir, "predictions.png")
        prediction_figure(trainer.model, cfg, n_tasks=4).savefig(fig_path, dpi=100)
        print(f"picture of predictions on unseen tasks: {fig_path}")
    if not args.no_report:
        short_evaluation(trainer, cfg, path if not args.no_export else None,
                         os.path.join("reports", cfg.name), logdir)
    print(f"\nTensorBoard: tensorboard --logdir {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
