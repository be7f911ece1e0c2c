"""Handball action recognition: DVC stages, Hydra configs and MLflow tracking for three models."""

import os as _os

# TensorFlow's C++ start-up chatter (CUDA probing on CPU-only machines) drowns the stage logs.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
