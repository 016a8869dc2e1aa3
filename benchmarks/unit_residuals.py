"""How wide are the prior's query residuals in the head's unit (model.y_scale)?

For tasks of a preset's training prior, standardises every query's y as the model does
(ContextStandardizer: the base fit's residual over the unit) and prints, per bucket of
context sizes, the median unit (in context stds) and the 5/25/50/75/95% quantiles of the
standardised residuals, for each unit: "std" (the context's std), "loo" (the base fit's
leave-one-out error), "loo_gp" (that error per point, times a kernel base fit's relative
predictive std there; with kernel fits) and, for comparison, "loo" without its small-context
term e^(3 - k) (how it was first tried: the least of the fits' leave-one-out errors is often
near 0 by chance at a handful of points). A unit is good for the bar head when these
quantiles are alike in every bucket; the last column, the median over the queries of
log(unit) + z^2 / 2 + log(2 pi) / 2 with the unit in context stds, is the Gaussian negative
log-likelihood of the base fit with the unit as its std (lower: the unit alone is the better
predictive spread).

    python benchmarks/unit_residuals.py [--preset default] [--tasks 2048] [--set K=V ...]

The term matters most where the leave-one-out errors are wrong: before the ridge fits'
leave-one-out counted the intercept (`--set model.loo_intercept=false`), a near-interpolating
fit's was about 0 from n <= d + 1 points and the residuals without the term spread over
thousands of units at 3-5 points; with it, over about ten.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from gpicl_tf.config import apply_overrides, get_preset  # noqa: E402
from gpicl_tf.layers import loo_small_context_term  # noqa: E402
from gpicl_tf.train import standardised_prior  # noqa: E402

BUCKETS = ((0, 3), (3, 6), (6, 12), (12, 24), (24, 65))
LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--tasks", type=int, default=2048)
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="config overrides, e.g. model.loo_intercept=false")
    a = p.parse_args(argv)
    try:
        cfg = apply_overrides(get_preset(a.preset), a.set)
    except ValueError as e:
        p.error(str(e))
    if cfg.model.base_fit == "none":
        p.error(f"--preset {a.preset}: model.base_fit is {cfg.model.base_fit!r}; the units "
                "compared here need a base fit")
    units = {}  # name: (z [T, N], unit [T, N] in the context's stds)
    rules = ("std", "loo") + (("loo_gp",) if cfg.model.kernel_length_scales else ())
    for rule in rules:
        z, unit, b = standardised_prior(apply_overrides(cfg, [f"model.y_scale={rule}"]),
                                        a.tasks)
        units[rule] = (z[..., 0], np.broadcast_to(unit[..., 0], z.shape[:2]))
    q = b["is_query"].numpy() > 0.5
    n = (~q).sum(axis=1)[:, None]
    # the loo unit without its small-context term: the same unit, the term taken back out
    ratio = units["loo"][1] / units["std"][1]
    bare = np.sqrt(np.maximum(ratio ** 2 - loo_small_context_term(n.astype(np.float64)),
                              1e-6))
    bare = np.where(n < 3, ratio, bare)
    units["loo, no e^(3-k)"] = (units["loo"][0] * (ratio / bare), bare * units["std"][1])
    n = n[:, 0]
    print(f"{a.tasks} tasks of the `{a.preset}` prior (seed {cfg.train.seed}, the bar borders' "
          "stream); standardised query residuals (y - base) / unit")
    print("| unit | context points | tasks | median unit (context stds) | "
          + " | ".join(f"{v:.0%}" for v in LEVELS) + " | median Gaussian NLL |")
    print("|---|---|---:|---:|" + "---:|" * len(LEVELS) + "---:|")
    for name, (z, unit) in units.items():
        rel = unit / units["std"][1]
        for lo, hi in BUCKETS:
            t = (n >= lo) & (n < hi)
            if not t.any():
                continue
            zq, uq = z[t][q[t]], rel[t][q[t]]
            nll = np.log(uq) + 0.5 * np.square(np.clip(zq, -1e6, 1e6)) + 0.5 * np.log(2 * np.pi)
            print(f"| {name} | {lo}-{hi - 1} | {int(t.sum())} | {np.median(uq):.3g} | "
                  + " | ".join(f"{v:.3g}" for v in np.quantile(zq, LEVELS))
                  + f" | {np.median(nll):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
