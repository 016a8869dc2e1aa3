"""The paper's experiments: one model per setting, in sequence, resumable.

    gpicl-experiment phase-transition --family random_mlp --preset small --n-tasks 2^0..2^16:2
    gpicl-experiment batch-size --family digits --preset small --batch-sizes 16,32,64,128
    gpicl-experiment biased-tasks --family digits --preset small --fractions 0,0.25
    gpicl-experiment model-size --family random_mlp --preset small --sizes 32x1,64x2,128x4

Every setting trains in <out>/runs/<setting> (TensorBoard events with HParams,
checkpoints), so an interrupted sweep resumes mid-setting, and a finished
setting (its result.json exists) is not trained again. The sweep writes
<out>/results.json, <out>/results.md and <out>/<experiment>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from gpicl_tf.config import ExperimentConfig, apply_overrides, unseen_task_config
from gpicl_tf.files import write_atomic
from gpicl_tf.experiments.presets import FAMILIES, SIZES, base_config

EXPERIMENTS = ("phase-transition", "batch-size", "biased-tasks", "model-size")


def parse_n_tasks(spec: str) -> list:
    """"2^0..2^16:2" -> [1, 4, ..., 65536, None]; "1,8,none" -> [1, 8, None].

    The range form always ends with None (unlimited tasks), the reference.
    """
    spec = spec.replace(" ", "")
    if ".." in spec:
        step = 1
        if ":" in spec:
            spec, step_s = spec.split(":")
            step = int(step_s)
        lo, hi = spec.split("..")
        if not (lo.startswith("2^") and hi.startswith("2^")):
            raise ValueError(f"--n-tasks {spec!r}: expected 2^a..2^b[:step] or a list")
        return [2**e for e in range(int(lo[2:]), int(hi[2:]) + 1, step)] + [None]
    out = []
    for item in spec.split(","):
        if item.lower() == "none":
            out.append(None)
        elif item.startswith("2^"):
            out.append(2 ** int(item[2:]))
        else:
            out.append(int(item))
    return out


def settings(experiment: str, args) -> list:
    """[(setting name, overrides)] of an experiment."""
    if experiment == "phase-transition":
        return [(f"tasks_{'inf' if t is None else t}", [f"task.n_tasks={t}"])
                for t in parse_n_tasks(args.n_tasks)]
    if experiment == "batch-size":
        return [(f"batch_{b}", [f"train.batch_size={b}"])
                for b in _ints(args.batch_sizes, "--batch-sizes")]
    if experiment == "biased-tasks":
        return [(f"biased_{round(100 * f)}pct", [f"task.biased_fraction={f}"])
                for f in _floats(args.fractions, "--fractions")]
    if experiment == "model-size":
        out = []
        for item in args.sizes.split(","):
            try:
                d, layers = (int(v) for v in item.lower().split("x"))
            except ValueError:
                raise ValueError(f"--sizes {item!r}: expected D_MODELxLAYERS, e.g. 64x2") from None
            out.append((f"d{d}_l{layers}", [f"model.d_model={d}", f"model.n_layers={layers}",
                                            f"model.n_heads={max(1, d // 16)}"]))
        return out
    raise ValueError(f"experiment {experiment!r} is unknown: expected one of {EXPERIMENTS}")


def _ints(text, flag):
    from gpicl_tf.cli import int_list

    return int_list(flag, text, low=1)


def _floats(text, flag):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from None


# ------------------------------------------------------------------ metrics
def trivial_loss(cfg: ExperimentConfig) -> float:
    """Loss of the best context-free guess: ln C (classification), 1 (standardised y)."""
    return math.log(cfg.task.y_dim) if cfg.task.kind == "classification" else 1.0


def evaluate_setting(trainer, cfg: ExperimentConfig) -> dict:
    """Loss (and accuracy) on seen tasks (the pool, new inputs) and on unseen tasks,
    over all context sizes and at a fixed k = n_points / 2."""
    from gpicl_tf import evaluate as evaluation

    half = cfg.task.n_points // 2
    out = {}
    for which, task in (("unseen", unseen_task_config(cfg.task)),
                        ("seen", dataclasses.replace(cfg.task, biased_fraction=0.0))):
        for tag, k in (("", None), (f"_k{half}", half)):
            b = evaluation.unseen_batch(cfg, cfg.train.eval_tasks, n_context=k,
                                        stream=evaluation.SWEEP_STREAM, task=task)
            for name, value in evaluation.batch_metrics(trainer.model, cfg, b).items():
                out[f"{which}_{name}{tag}"] = value
    return out


def loss_curve(logdir: str) -> list:
    """[(step, train loss)] from the run's TensorBoard events (whole run, resumes too)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"tensors": 0})
    acc.Reload()
    if "train/loss" not in acc.Tags()["tensors"]:
        return []
    pts = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")}
    return sorted(pts.items())


def plateau_exit(curve, level: float, fraction: float = 0.8):
    """First logged step whose loss is below fraction * level (None if never)."""
    for step, loss in curve:
        if loss < fraction * level:
            return step
    return None


def run_setting(name, cfg, out_dir, verbose=True) -> dict:
    """Trains (or resumes) one setting and evaluates it; cached in result.json."""
    import tensorflow as tf

    from gpicl_tf.summaries import Writer
    from gpicl_tf.train import Trainer

    logdir = os.path.join(out_dir, "runs", name)
    done = os.path.join(logdir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    trainer = Trainer(cfg, logdir, strategy=tf.distribute.get_strategy())
    trainer.train(verbose=verbose)
    metrics = evaluate_setting(trainer, cfg)
    curve = loss_curve(logdir)
    level = trivial_loss(cfg)
    m = cfg.model
    result = {
        "name": name, "config": cfg.to_dict(), "metrics": metrics,
        "n_params": int(trainer.model.count_params()),
        # Accessible state (Kirsch et al.): key size x layers x sequence length.
        "state_size": m.head_dim * m.n_heads * m.n_layers * cfg.task.n_points,
        "loss_curve": curve, "plateau_level": level,
        "plateau_exit_step": plateau_exit(curve, level),
    }
    w = Writer(logdir, cfg)
    w.scalars(cfg.train.steps, {f"final/{k}": v for k, v in metrics.items()})
    w.flush()
    # The setting counts as finished only once this file exists, whole.
    write_atomic(done, json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------ outputs
def summarize(experiment: str, results: list) -> dict:
    """Sweep-level findings (the phase-transition point)."""
    out = {}
    if experiment == "phase-transition":
        ref = [r for r in results if r["config"]["task"]["n_tasks"] is None]
        if ref:
            target = 1.1 * ref[0]["metrics"]["unseen_loss"]
            hits = [r["config"]["task"]["n_tasks"] for r in results
                    if r["config"]["task"]["n_tasks"] is not None
                    and r["metrics"]["unseen_loss"] <= target]
            out["unlimited_unseen_loss"] = ref[0]["metrics"]["unseen_loss"]
            out["n_tasks_within_10pct_of_unlimited"] = min(hits) if hits else None
    return out


def markdown(experiment: str, results: list, summary: dict) -> str:
    cls = any("seen_accuracy" in r["metrics"] for r in results)
    base = ["seen_loss", "unseen_loss"] + (["seen_accuracy", "unseen_accuracy"] if cls else [])
    # Averages over context sizes 0..N-1, then the same at a fixed k = N/2.
    fixed = [c for c in (results[0]["metrics"] if results else {}) if "_k" in c]
    cols = base + sorted(fixed, key=lambda c: (base.index(c.split("_k")[0]), c))
    lines = [f"## {experiment}", "",
             "| setting | params | state | " + " | ".join(cols) + " | plateau exit step |",
             "|---|---:|---:|" + "---:|" * (len(cols) + 1)]
    for r in results:
        cells = [f"{r['metrics'][c]:.4f}" for c in cols]
        lines.append(f"| {r['name']} | {r['n_params']} | {r['state_size']} | "
                     + " | ".join(cells) + f" | {r['plateau_exit_step']} |")
    for k, v in summary.items():
        lines.append(f"\n{k}: {v}")
    return "\n".join(lines) + "\n"


def plot(experiment: str, results: list, path: str) -> None:
    from gpicl_tf.summaries import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if experiment == "phase-transition":
        pool = [r for r in results if r["config"]["task"]["n_tasks"] is not None]
        t = [r["config"]["task"]["n_tasks"] for r in pool]
        ax.plot(t, [r["metrics"]["seen_loss"] for r in pool], "o-", label="seen tasks")
        ax.plot(t, [r["metrics"]["unseen_loss"] for r in pool], "s-", label="unseen tasks")
        for r in results:
            if r["config"]["task"]["n_tasks"] is None:
                ax.axhline(r["metrics"]["unseen_loss"], color="k", ls="--",
                           label="unlimited tasks (unseen)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of training tasks")
        ax.set_ylabel("loss")
    elif experiment == "model-size":
        ax.plot([r["n_params"] for r in results], [r["metrics"]["unseen_loss"] for r in results],
                "o-")
        for r in results:
            ax.annotate(f"{r['name']} (state {r['state_size']})",
                        (r["n_params"], r["metrics"]["unseen_loss"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("unseen-task loss")
    else:
        for r in results:
            steps, losses = zip(*r["loss_curve"]) if r["loss_curve"] else ((), ())
            ax.plot(steps, losses, label=r["name"])
        if results:
            ax.axhline(0.8 * results[0]["plateau_level"], color="k", ls=":", lw=1,
                       label="plateau exit level")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    ax.set_title(experiment)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_hparams_config(out_dir: str, cfg: ExperimentConfig) -> None:
    """Declares the final metrics so TensorBoard's HParams view shows them per setting."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    names = ["seen_loss", "unseen_loss"]
    if cfg.task.kind == "classification":
        names += ["seen_accuracy", "unseen_accuracy"]
    with tf.summary.create_file_writer(os.path.join(out_dir, "runs")).as_default():
        hp.hparams_config(hparams=[], metrics=[hp.Metric(f"final/{n}") for n in names])


def run(experiment: str, base: ExperimentConfig, setting_list: list, out_dir: str,
        verbose: bool = True) -> dict:
    """Runs every setting in sequence and writes the sweep's outputs."""
    configs = []
    for name, overrides in setting_list:  # validate every setting before any work
        configs.append((name, apply_overrides(base, overrides + [f"name={name}"])))
    os.makedirs(out_dir, exist_ok=True)
    write_hparams_config(out_dir, base)
    results = []
    for i, (name, cfg) in enumerate(configs):
        if verbose:
            print(f"[{i + 1}/{len(configs)}] {experiment}: {name}")
        results.append(run_setting(name, cfg, out_dir, verbose))
    summary = summarize(experiment, results)
    doc = {"experiment": experiment, "base": base.to_dict(), "summary": summary,
           "settings": {r["name"]: r for r in results}}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(experiment, results, summary))
    plot(experiment, results, os.path.join(out_dir, f"{experiment}.png"))
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpicl-experiment", description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=EXPERIMENTS, help="which sweep to run")
    p.add_argument("--family", default="random_mlp", choices=FAMILIES,
                   help="random_mlp, or a base dataset for classification tasks")
    p.add_argument("--preset", default="small", choices=SIZES,
                   help="base size: tiny (tests, seconds), small (2-core CPU, 10-15 min per "
                        "sweep), paper (GPUs, the paper's model)")
    p.add_argument("--data-dir", default="~/tensorflow_datasets",
                   help="where tfds datasets are prepared (digits prepares itself)")
    p.add_argument("--out", help="output folder (default reports/experiments/<experiment>-"
                                 "<family>-<preset>)")
    p.add_argument("--n-tasks", default="2^0..2^16:2",
                   help="phase-transition settings: 2^a..2^b[:step] (then unlimited) or a "
                        "list like 1,16,none")
    p.add_argument("--batch-sizes", default="16,32,64,128",
                   help="batch-size settings: multiples of task.block_size (8)")
    p.add_argument("--fractions", default="0,0.25,0.5",
                   help="biased-tasks settings: fractions of each block given to one fixed "
                        "task, multiples of 1/block_size")
    p.add_argument("--sizes", default="32x1,64x2,64x4,128x4",
                   help="model-size settings: D_MODELxLAYERS")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override the base config (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    from gpicl_tf.cli import quiet_tensorflow
    from gpicl_tf.files import check_dir_arg

    out = a.out or os.path.join("reports", "experiments", f"{a.experiment}-{a.family}-{a.preset}")
    try:
        check_dir_arg("--out", out)
        base = base_config(a.family, a.preset, a.data_dir, a.set)
        setting_list = settings(a.experiment, a)
        for name, overrides in setting_list:  # every setting valid before any work
            apply_overrides(base, overrides + [f"name={name}"])
    except ValueError as e:
        print(f"gpicl-experiment: error: {e}", file=sys.stderr)
        return 2
    quiet_tensorflow()
    doc = run(a.experiment, base, setting_list, out, verbose=not a.quiet)
    print(markdown(a.experiment, list(doc["settings"].values()), doc["summary"]))
    print(f"wrote {out}/results.json, results.md, {a.experiment}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

