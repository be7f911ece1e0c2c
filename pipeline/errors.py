"""The package's expected failures, and a tracking server's refusals turned into one of them."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator


class PipelineError(RuntimeError):
    """An expected failure (missing input, unusable config value) reported without a traceback."""


# MLflow's REST client: "API request to endpoint /api/2.0/mlflow/runs/create failed with error
# code 403 != 200. Response body: 'Permission denied'"
REFUSED_ENDPOINT = re.compile(r"endpoint (/\S+) failed with error code (\d+)")
# what a path of MLflow's REST API acts on, for naming the permission a refused user lacks
REGISTRY_PATHS = ("/registered-models/", "/model-versions/")
ACCESS_DOCS = 'docs/mlflow.md "Access control"'


def is_refusal(exc: BaseException) -> bool:
    """Whether `exc` is an MLflow tracking server's HTTP 401 or 403 (not, say, a 404 for a
    model that does not exist)."""
    exceptions = sys.modules.get("mlflow.exceptions")  # none raised before MLflow is imported
    return (
        exceptions is not None
        and isinstance(exc, exceptions.MlflowException)
        and exc.get_http_status_code() in (401, 403)
    )


def refusal_message(exc: BaseException) -> str | None:
    """One line for an MLflow tracking server's HTTP 401 (who are you?) or 403 (not allowed),
    naming what to set or whom to ask; None for any other failure."""
    if not is_refusal(exc):
        return None
    import mlflow

    server = mlflow.get_tracking_uri()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    found = REFUSED_ENDPOINT.search(str(exc))
    endpoint = found.group(1) if found else "a request"
    if exc.get_http_status_code() == 401:
        if not user:
            return (
                f"the MLflow server {server} asks who you are (HTTP 401 on {endpoint}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on it"
            )
        return (
            f"the MLflow server {server} refused user {user!r} (HTTP 401 on {endpoint}): check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (wrong name or password)"
        )
    if "/users/" in endpoint:
        needs = "the server's admin, or MANAGE on the resource whose permissions change"
    elif any(part in endpoint for part in REGISTRY_PATHS):
        needs = (
            "EDIT on the registered model (ask whoever holds MANAGE on it), or register "
            "nothing from this run: -S compare.register_as=null"
        )
    else:
        needs = "EDIT on the experiment (ask the server's admin)"
    return (
        f"the MLflow server {server} refused user {user or '(anonymous)'!r} (HTTP 403 on "
        f"{endpoint}): that takes {needs}; {ACCESS_DOCS}"
    )


@contextlib.contextmanager
def server_refusals() -> Iterator[None]:
    """Raise a tracking server's refusal (HTTP 401, 403) as a PipelineError saying what to set,
    so the command line ends in one line instead of a traceback."""
    try:
        yield
    except Exception as exc:
        message = refusal_message(exc)
        if message is None:
            raise
        raise PipelineError(message) from None
