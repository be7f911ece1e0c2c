"""The logged ensemble's model code (see the package docstring)."""

from mlflow.models import set_model

from pipeline.serving.ensemble import EnsembleClassifierModel

set_model(EnsembleClassifierModel())
