"""Small helpers shared by every layer: params, paths, logging, atomic writes, seeding."""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

log = logging.getLogger("pipeline")


# TensorFlow's C++ start-up lines, which users read as errors: CUDA probing on machines without
# a GPU, oneDNN and CPU-instruction notes, absl's "before InitializeLog" banner. TensorFlow
# 2.19+ writes them before it reads TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442).
TF_STARTUP_NOISE = re.compile(
    r"absl::InitializeLog\(\)|oneDNN custom operations|cudart_stub|Could not find cuda drivers"
    r"|cpu_feature_guard|rebuild TensorFlow with the appropriate compiler flags"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer|TF-TRT Warning"
    r"|failed call to cuInit"
)
QUIET_TF_ENV = "HANDBALL_QUIET_TF"  # marks TF_CPP_MIN_LOG_LEVEL as set by us, not by the user


@contextlib.contextmanager
def filtered_c_stderr(noise: re.Pattern) -> Iterator[None]:
    """Send file descriptor 2 (where C++ libraries write) to a temporary file while the block
    runs, then pass on every line that does not match `noise`."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to redirect: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not noise.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once and runs its import inside `filtered_c_stderr`."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            with filtered_c_stderr(TF_STARTUP_NOISE):
                exec_module(module)
                # probing the devices now keeps its "failed call to cuInit" (no GPU) in here
                with contextlib.suppress(Exception):
                    module.config.list_physical_devices()

        spec.loader.exec_module = quiet_exec_module
        return spec


def quiet_tensorflow_startup() -> None:
    """Keep TensorFlow's start-up lines out of this package's processes (stages, their
    workers, predict, served models), unless the user chose TF_CPP_MIN_LOG_LEVEL: then
    TensorFlow logs as they asked. Call before TensorFlow is imported."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ and os.environ.get(QUIET_TF_ENV) != "1":
        return  # the user's own setting wins
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's own INFO and WARNING lines
    os.environ[QUIET_TF_ENV] = "1"  # inherited by worker processes, which do the same
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


SPLITS = ("train", "val", "test")


class PipelineError(RuntimeError):
    """An expected failure (missing input, unusable config value) reported without a traceback."""


def repo_root() -> Path:
    """The workspace being run: `params.yaml`, `conf/` and every configured path resolve here.

    This is the working directory. DVC runs each stage in the folder of `dvc.yaml`, which for a
    queued experiment is a temporary copy of the repository; `DVC_ROOT` then still names the
    original repository, so it must not be used for inputs and outputs (see `store_root`).
    """
    return Path.cwd().resolve()


def store_root() -> Path:
    """Where the results that outlive a workspace live (`mlflow.db`, `mlruns/`): the repository
    DVC was started in (`DVC_ROOT`, also for queued experiments), else the workspace."""
    root = os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root else repo_root()


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Read the composed configuration (`params.yaml`) that every DVC stage reads, checked
    against `pipeline/schema.py`: a PipelineError lists every problem, one line each, before
    a stage reads data or opens an MLflow run."""
    from pipeline.schema import InvalidConfig, validate_params

    path = Path(path) if path else repo_root() / "params.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `python -m pipeline.params` to compose it from conf/"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            return validate_params(yaml.safe_load(fh))
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {exc}") from None
    except InvalidConfig as exc:
        raise PipelineError(
            f"{path} breaks the config schema ({len(exc.problems)} problem(s); fix conf/ or "
            "the override and compose again with `python -m pipeline.params`):\n  "
            + "\n  ".join(exc.problems)
        ) from None


def resolve(path: str | Path) -> Path:
    """A config path made absolute against the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def dataset_name(ds: dict) -> str:
    """`dataset.name`, or (when it is null) the name of the folder, archive or URL the clips
    come from (`cricket_shots` for `.../cricket_shots` or `cricket_shots.tar.gz`)."""
    if ds.get("name"):
        return str(ds["name"])
    where = str(ds.get("url") or ds.get("path") or ds.get("source") or "dataset")
    name = Path(where.rstrip("/").split("?")[0]).name or "dataset"
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def dataset_classes(params: dict) -> list[str]:
    """The class list, in class-index order: `dataset.classes`, or when that is null the
    classes the clean stage recorded (the class folders the download stage found)."""
    if params["dataset"].get("classes"):
        return list(params["dataset"]["classes"])
    path = resolve(params["paths"]["clean"]) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the clean stage first")
    return list(json.loads(path.read_text())["classes"])


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (if loaded) Keras/TensorFlow for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # Same seed, same data -> same model: without this, multi-threaded CPU kernels reorder
    # float sums and two runs of one config end with different test scores.
    tf.config.experimental.enable_op_determinism()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `target` only if the block succeeds.

    A crashed stage therefore never leaves a half-written output that a later stage would trust.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write via a temporary sibling and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def worker_count(requested: int | None) -> int:
    """`requested` processes, or one per available core when it is null/0."""
    if requested:
        return max(1, int(requested))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def parallel_map(
    fn: Callable[[Any], Any], items: list, workers: int | None, desc: str, unit: str = "clip"
) -> Iterator[Any]:
    """`fn` over `items` in worker processes, results in input order, with a progress bar.

    Results are yielded as they arrive (in order), so a caller can write each one away and
    keep memory bounded by a few items, not the whole list. `fn` must be a module-level
    function of an importable module. One worker (or one item) runs in this process.
    """
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from itertools import islice

    from tqdm import tqdm

    n = min(worker_count(workers), max(1, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit=unit)
    try:
        if n == 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        # forkserver, not fork: a process that has loaded TensorFlow (tests, notebooks) holds
        # threads and locks that a forked child would inherit mid-use and deadlock on.
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([fn.__module__])  # workers start with it imported
        else:
            context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n, mp_context=context) as pool:
            # a bounded look-ahead: results never pile up far ahead of the caller
            it = iter(items)
            pending = deque(pool.submit(fn, x) for x in islice(it, 2 * n))
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(fn, x) for x in islice(it, 1))
                yield result
                bar.update()
    finally:
        bar.close()


def stage_cli(
    name: str,
    description: str,
    run: Callable[[dict, argparse.Namespace], Any],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """The thin command line around a stage function: `--params`, logging, timing, exit codes.

    Expected failures (PipelineError, a missing input file) end with one clear log line and
    exit status 2 instead of a traceback.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline.stages.{name}", description=description
    )
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    try:
        run(load_params(args.params), args)
    except (PipelineError, FileNotFoundError) as exc:
        log.error("%s failed: %s", name, exc)
        sys.exit(2)
    log.info("%s finished in %.1f s", name, time.perf_counter() - start)
