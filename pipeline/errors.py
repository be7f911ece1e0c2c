"""The package's expected failures."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """An expected failure (missing input, unusable config value) reported without a traceback."""
