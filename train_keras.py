"""Meta-train an in-context learner, export it for TF Serving, and report.

    python train_keras.py                         # the `default` preset on a CPU
    python train_keras.py --preset tiny --steps 200
    python train_keras.py --preset paper --set model.n_layers=8

Runs resume: the same command after an interruption continues from the last
checkpoint in --logdir. All logic lives in gpicl_tf.cli.
"""

import sys

from gpicl_tf.cli import main

if __name__ == "__main__":
    sys.exit(main())
