"""Serving: the video classifier a logged model carries, its MLflow pyfunc, the registry, `predict`."""
