"""Handball action recognition: DVC stages, Hydra configs and MLflow tracking for three models.

Importing the package changes nothing in the process. Entry points (stage commands, predict,
sweeps, served models) keep TensorFlow's start-up lines out (`pipeline.logs`); their worker
processes, which inherit the marker it sets, do the same as they import the package.
"""

import os as _os

if _os.environ.get("HANDBALL_QUIET_TF") == "1":  # `pipeline.logs.QUIET_TF_ENV`
    from pipeline.logs import quiet_tensorflow_startup as _quiet

    _quiet()
