"""The thin command line every stage module's `main()` is."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import load_config
from pipeline.errors import PipelineError, server_refusals
from pipeline.logs import quiet_tensorflow_runtime, setup_logging
from pipeline.schema import Params
from pipeline.tensorflow_start import prepare_tensorflow

log = logging.getLogger("pipeline")


def stage_cli(
    name: str,
    description: str,
    run: Callable[[Params, argparse.Namespace], Any],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """The thin command line around a stage function: `--params` (read once, typed: `run`
    hands each function its own sections), logging, timing, exit codes.

    Expected failures (PipelineError, a missing input file, a tracking server's refusal) end
    with one clear log line and exit status 2 instead of a traceback.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline.stages.{name}", description=description
    )
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    prepare_tensorflow()  # before any stage code imports TensorFlow
    # a progress bar per sub-second download of a logged model's files (compare, registering)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    start = time.perf_counter()
    try:
        with server_refusals(), quiet_tensorflow_runtime():
            run(load_config(args.params), args)
    except (PipelineError, FileNotFoundError) as exc:
        log.error("%s failed: %s", name, exc)
        sys.exit(2)
    log.info("%s finished in %.1f s", name, time.perf_counter() - start)
