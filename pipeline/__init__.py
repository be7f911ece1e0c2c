"""Handball action recognition: DVC stages, Hydra configs and MLflow tracking for three models."""

from pipeline.common import quiet_tensorflow_startup

# before any module of the package imports TensorFlow (stages, their workers, predict, serving)
quiet_tensorflow_startup()
