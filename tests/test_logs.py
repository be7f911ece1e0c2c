"""TensorFlow's C++ start-up lines stay out of the package's processes unless the user asked
for them with TF_CPP_MIN_LOG_LEVEL; other stderr output passes through."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

from pipeline.logs import QUIET_TF_ENV, TF_STARTUP_NOISE

# what an entry point does: keep TensorFlow quiet, then import Keras/TensorFlow and use them
USES_TENSORFLOW = (
    "from pipeline.logs import quiet_tensorflow_startup; quiet_tensorflow_startup(); "
    "import os, pipeline.models.builders, keras, tensorflow as tf; "
    "keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).predict(tf.ones((1, 3)), "
    "verbose=0); print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
)


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_ENV)}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )


def test_tensorflow_start_up_lines_are_silenced_by_default():
    proc = python(USES_TENSORFLOW)
    assert proc.stdout.strip() == "2"
    assert not [line for line in proc.stderr.splitlines() if TF_STARTUP_NOISE.search(line)]


def test_the_users_tf_cpp_min_log_level_wins():
    """With the user's own level TensorFlow logs as usual (on this CPU-only machine: the
    oneDNN and CUDA lines), which also shows that the default test above is not vacuous."""
    proc = python(USES_TENSORFLOW, TF_CPP_MIN_LOG_LEVEL="0")
    assert proc.stdout.strip() == "0"
    assert TF_STARTUP_NOISE.search(proc.stderr), proc.stderr[-2000:]


def test_other_c_level_stderr_lines_pass_through():
    code = (
        "import os\n"
        "from pipeline.logs import TF_STARTUP_NOISE, streamed_c_stderr\n"
        "with streamed_c_stderr(TF_STARTUP_NOISE):\n"
        "    os.write(2, b'I0000 cudart_stub.cc:31] Could not find cuda drivers\\n')\n"
        "    os.write(2, b'E0000 something real went wrong\\n')\n"
    )
    proc = python(code)
    assert "something real went wrong" in proc.stderr
    assert "cudart_stub" not in proc.stderr


def test_training_noise_is_dropped_and_the_rest_passes_in_order():
    """While a stage or `predict` runs (`quiet_tensorflow_runtime`), TensorFlow's known-harmless
    error-level lines (TF_RUNTIME_NOISE, as a training run prints them) are dropped; every
    other line passes, in order, C++'s and Python's alike; after it, stderr is as before.
    With the user's own TF_CPP_MIN_LOG_LEVEL nothing is filtered."""
    noise = (
        "E0000 00:00:1 node_def_util.cc:682] NodeDef mentions attribute use_unbounded_threadpool"
        " which is not in the op definition: Op<name=MapDataset; ...>"
    )
    code = (
        "import os, sys\n"
        "from pipeline.logs import quiet_tensorflow_runtime, quiet_tensorflow_startup\n"
        "quiet_tensorflow_startup()\n"
        "with quiet_tensorflow_runtime():\n"
        "    os.write(2, b'first\\n')\n"
        f"    os.write(2, {noise!r}.encode() + b'\\n')\n"
        "    print('python logs', file=sys.stderr, flush=True)\n"
        "    os.write(2, b'E0000 something real went wrong\\n')\n"
        "print('after', file=sys.stderr, flush=True)\n"
    )
    proc = python(code)
    assert proc.stderr.splitlines() == [
        "first",
        "python logs",
        "E0000 something real went wrong",
        "after",
    ], proc.stderr
    assert noise in python(code, TF_CPP_MIN_LOG_LEVEL="0").stderr


def test_importing_the_package_leaves_the_process_as_it_was():
    """A notebook or another program importing `pipeline` keeps TensorFlow's own logging; a
    worker process of a quiet entry point (the marker in its environment) stays quiet."""
    check = "import os, pipeline; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    assert python(check).stdout.strip() == "None"
    worker = python(check.replace("pipeline;", "pipeline, tensorflow;"), **{QUIET_TF_ENV: "1"})
    assert worker.stdout.strip() == "2"
    assert not [line for line in worker.stderr.splitlines() if TF_STARTUP_NOISE.search(line)]


def test_a_block_that_started_a_long_lived_process_ends_when_its_own_lines_are_out():
    """A process started in the block keeps a copy of the pipe (a pool's forkserver lives
    until the stage exits): the block still ends at once, after every line written in it,
    and the child's later lines still pass, filtered. (Waiting for the pipe to close cost
    every clean and frames stage 10 s.)"""
    code = (
        "import os, subprocess, sys, time\n"
        "from pipeline.logs import TF_STARTUP_NOISE, streamed_c_stderr\n"
        'child = \'import os, time; time.sleep(3); os.write(2, b"cudart_stub\\\\n");'
        ' os.write(2, b"child, later\\\\n")\'\n'
        "start = time.monotonic()\n"
        "with streamed_c_stderr(TF_STARTUP_NOISE):\n"
        "    worker = subprocess.Popen([sys.executable, '-c', child])\n"
        "    os.write(2, b'in the block\\n')\n"
        "print(f'block ended after {time.monotonic() - start:.1f} s', file=sys.stderr, flush=True)\n"
        "worker.wait()\n"
        "time.sleep(0.5)\n"
    )
    lines = python(code).stderr.splitlines()
    assert lines[0] == "in the block", lines
    assert lines[1].startswith("block ended after") and float(lines[1].split()[3]) < 2, lines
    assert lines[2:] == ["child, later"], lines
