"""The logged video classifier's model code (see the package docstring)."""

from mlflow.models import set_model

from pipeline.serving.pyfunc import VideoClassifierModel

set_model(VideoClassifierModel())
