"""The models that come with the package: predict at once, without training.

    from gpicl_tf import InContextRegressor, InContextClassifier
    InContextRegressor().fit(X, y).predict(X_test)        # the shipped regressor
    InContextClassifier().fit(X, labels).predict(X_test)  # the shipped classifier

Each is a SavedModel version folder under gpicl_tf/shipped/<kind>/ (TF Serving's
warmup requests included) with manifest.json: the command that made it, its
training figures and the SHA-256 of every file. One seeded command makes each:

    python -m gpicl_tf.pretrained regressor     # presets `regressor_base`, `regressor`
    python -m gpicl_tf.pretrained classifier    # preset `classifier`, runs/gpicl-classifier

It trains the preset after the presets it starts from (`train.init_from`: the
regressor is `regressor_base`, then 2,000 steps on noisier tasks), each in its run
folder under --runs-dir (resumed if one exists: a finished run is not trained
again), exports the final weights and replaces the shipped folder atomically.
`gpicl-export --pretrained regressor|classifier` writes a shipped model into
exports/ in TF Serving's layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid

from gpicl_tf.tfserving import SERVING_ROOT

KINDS = {"regressor": "regressor", "classifier": "classifier"}  # kind -> training preset
MANIFEST = "manifest.json"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"pretrained={kind!r}: expected one of {sorted(KINDS)}")
    return kind


def folder(kind: str) -> str:
    """The shipped model's SavedModel version folder; ValueError if it is not there."""
    path = os.path.join(SHIPPED, _check_kind(kind))
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise ValueError(f"the shipped {kind} is missing from {path}: expected a SavedModel "
                         f"there (make it with: python -m gpicl_tf.pretrained {kind})")
    return path


def manifest(kind: str) -> dict:
    with open(os.path.join(folder(kind), MANIFEST)) as f:
        return json.load(f)


def file_digests(path: str) -> dict:
    """SHA-256 of every file under path but the manifest, by relative path."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            with open(full, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(out.items()))


def checksum(path: str, digests=None) -> str:
    """One SHA-256 over the files' relative paths and digests (the manifest excluded);
    digests: file_digests(path), if already computed."""
    digests = file_digests(path) if digests is None else digests
    text = "".join(f"{rel}\0{digest}\n" for rel, digest in digests.items())
    return hashlib.sha256(text.encode()).hexdigest()


def size_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def phases(preset: str) -> list:
    """The presets that train preset, first to last: its train.init_from chain."""
    from gpicl_tf.config import get_preset

    chain = [preset]
    while first := get_preset(chain[0]).train.init_from:
        if first in chain:
            raise ValueError(f"preset {first!r}: train.init_from goes round in a circle "
                             f"({' <- '.join([first] + chain)})")
        chain.insert(0, first)
    return chain


def build(kind: str, runs_dir: str = "runs", shipped_dir: str = SHIPPED) -> dict:
    """Trains the kind's preset after the presets it starts from (seeded; each resumes or
    reuses its run folder under runs_dir), exports it and replaces shipped_dir/<kind>
    atomically; returns the manifest it records."""
    import tensorflow as tf

    from gpicl_tf.config import get_preset
    from gpicl_tf.export import export_model
    from gpicl_tf.train import Trainer

    preset = KINDS[_check_kind(kind)]
    t0 = time.time()
    done = []
    for name in phases(preset):
        cfg = get_preset(name)
        trainer = Trainer(cfg, os.path.join(runs_dir, cfg.name))
        result = trainer.train()
        done.append({"preset": name, "steps": int(result.step),
                     "final_loss": float(result.final_loss),
                     "eval_loss": float(result.eval_loss),
                     "steps_per_sec": float(result.steps_per_sec)})
    os.makedirs(shipped_dir, exist_ok=True)
    staging = os.path.join(shipped_dir, f".tmp-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    old = None
    try:
        vdir = export_model(trainer.model, cfg, staging, cfg.name, version=1)
        digests = file_digests(vdir)
        info = {
            "kind": kind, "preset": preset, "name": cfg.name,
            "command": f"python -m gpicl_tf.pretrained {kind}",
            "seed": cfg.train.seed, "steps": int(result.step),
            "final_loss": float(result.final_loss), "eval_loss": float(result.eval_loss),
            "steps_per_sec": float(result.steps_per_sec), "phases": done,
            "seconds_this_call": round(time.time() - t0, 1),
            "tensorflow": tf.__version__,
            "bytes": size_bytes(vdir), "files": digests, "sha256": checksum(vdir, digests)}
        with open(os.path.join(vdir, MANIFEST), "w") as f:
            json.dump(info, f, indent=1)
        final = os.path.join(shipped_dir, kind)
        if os.path.exists(final):  # swap: the old folder out, the new one in
            old = f"{staging}-old"
            os.rename(final, old)
        os.rename(vdir, final)
        return info
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def export_pretrained(kind: str, export_dir: str = "exports", model_name=None,
                      serving_root: str = SERVING_ROOT) -> str:
    """Copies the shipped model into export_dir/<name>/<next version> (TF Serving's layout,
    written atomically) and adds it to models.config; returns the version folder."""
    from gpicl_tf.config import check_name
    from gpicl_tf.export import load_config, write_version

    src = folder(kind)
    name = check_name(model_name or load_config(src).name, "--model-name")
    return write_version(export_dir, name, lambda tmp: shutil.copytree(
        src, tmp, ignore=shutil.ignore_patterns(MANIFEST)), serving_root=serving_root)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m gpicl_tf.pretrained",
                                description="Train and ship a pretrained model (seeded).")
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("--runs-dir", default="runs", help="parent of the run folder")
    args = p.parse_args(argv)
    from gpicl_tf.cli import quiet_tensorflow

    quiet_tensorflow()
    try:
        info = build(args.kind, args.runs_dir)
    except ValueError as e:  # a user error (e.g. a run folder of another config): one line
        p.error(f"{e} (this command's run folders are {args.runs_dir}/<the preset's name>: "
                "pass another --runs-dir, or move that folder aside)")
    print(f"shipped {args.kind}: {info['steps']} steps, final loss {info['final_loss']:.4f}, "
          f"unseen-task loss {info['eval_loss']:.4f}, {info['bytes'] / 1e6:.2f} MB, "
          f"sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
