"""Serving: the video classifier a logged model carries, its pyfunc, the registry, `predict`."""
