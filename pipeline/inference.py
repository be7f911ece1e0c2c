"""Where models logged before the package was layered find their MLflow pyfunc class.

Their pickled python model names `pipeline.inference.VideoClassifierModel`. A process that
has already imported this package (`python -m pipeline.predict`, the tests) resolves that name
here, so they load and predict with the current code, which reads the same model format
(`video-pyfunc/1`: the .keras file and `preprocessing.json`). A fresh `mlflow models serve`
uses the copy of the code logged with the model instead.
"""

from pipeline.serving.pyfunc import VideoClassifierModel

__all__ = ["VideoClassifierModel"]
