"""Where the main job's time goes: `python train_keras.py` with a clock on each phase.

    python benchmarks/main_job_phases.py [train_keras.py flags, e.g. --preset tiny]

Runs the main job exactly as `python train_keras.py ARGS` does (same code, same files:
runs/, exports/, reports/ of the current folder; a finished run is not trained again),
timing its phases: training (the train calls with their periodic evaluations and
checkpoints), the bar head's recalibration maps (fitted after the last step, inside
training), the export, the pictures, and the short report (its per-task baselines: the
time it waits for them, since they are fitted while the model runs; the model's
predictions through the export; the outputs). It then prints each phase in
seconds and as a share of the whole, with the fp32 matmul peak measured just before and
after, so that figures from different machines or hours can be compared; the job's own
output is printed as usual above it. Run it in a fresh folder to time a fresh job.
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import matmul_peak_gflops  # noqa: E402

PHASES = []  # (label, start, end) of every clocked call


def clocked(owner, name: str, label: str) -> None:
    """Replaces owner.name by the same function that also records when it ran."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        tic = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES.append((label, tic, time.perf_counter()))

    setattr(owner, name, timed)


def total(label: str, outside=None) -> float:
    """Seconds of the calls of `label` (only those outside every call of `outside`)."""
    spans = [(a, b) for name, a, b in PHASES if name == outside]
    return sum(b - a for name, a, b in PHASES if name == label
               and not any(s <= a and b <= e for s, e in spans))


def main(argv=None) -> int:
    peak_before = matmul_peak_gflops()
    tic = time.perf_counter()
    from gpicl_tf import baselines, cli, evaluate, export, train

    clocked(train.Trainer, "train", "training (with the maps)")
    clocked(train, "fit_recalibration", "recalibration maps")
    clocked(export, "export_if_changed", "export")
    clocked(evaluate, "prediction_figure", "pictures of predictions")
    clocked(cli, "short_evaluation", "short report")
    clocked(evaluate, "write_outputs", "report outputs (tables, plots)")
    if hasattr(evaluate, "_score_baselines"):  # fitted while the model runs: the wait
        clocked(evaluate, "_score_baselines", "report baselines (per-task fits)")
    elif hasattr(baselines, "per_task"):  # (older trees fit them inline)
        clocked(baselines, "per_task", "report baselines (per-task fits)")
    code = cli.main(argv)
    wall = time.perf_counter() - tic
    peak_after = matmul_peak_gflops()
    train_s, export_s = total("training (with the maps)"), total("export")
    report_s = total("short report")
    picture_s = total("pictures of predictions", outside="training (with the maps)")
    rows = [("training (with the maps)", train_s),
            ("  of which recalibration maps", total("recalibration maps")),
            ("  of which pictures for TensorBoard", total("pictures of predictions") - picture_s),
            ("export", export_s),
            ("picture of predictions (predictions.png)", picture_s),
            ("short report", report_s),
            ("  of which per-task baselines (waiting for them)",
             total("report baselines (per-task fits)")),
            ("  of which outputs (tables, plots)", total("report outputs (tables, plots)")),
            ("imports, start-up and the rest",
             wall - train_s - export_s - picture_s - report_s)]
    print(f"\nmain job phases (python train_keras.py {' '.join(argv or sys.argv[1:])}); "
          f"fp32 matmul peak {peak_before:.0f} GFLOP/s before, {peak_after:.0f} after")
    for label, sec in rows:
        print(f"{label:56s} {sec:7.1f} s  {sec / wall:5.1%}")
    print(f"{'whole job (in this process)':56s} {wall:7.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
