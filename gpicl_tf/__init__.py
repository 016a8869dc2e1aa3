"""gpicl_tf: meta-train transformers to learn in context (Kirsch et al. 2022), in TensorFlow/Keras."""

__version__ = "0.1.0"

from gpicl_tf.estimator import InContextClassifier, InContextRegressor  # noqa: E402

__all__ = ["InContextClassifier", "InContextRegressor", "__version__"]
