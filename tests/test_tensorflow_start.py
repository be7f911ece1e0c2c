"""The package's processes run TensorFlow's oneDNN kernels whatever the CPU (TensorFlow turns
them on by itself only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX), unless the
user set TF_ENABLE_ONEDNN_OPTS."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

from pipeline.tensorflow_start import ONEDNN_ENV

# what a stage process does: import the stages' package, then TensorFlow, and ask TensorFlow
# whether its oneDNN kernels are on (its own report, read from the environment as it loaded)
STAGE_PROCESS = (
    "import pipeline.stages, os; "
    "from tensorflow.python.util import _pywrap_util_port as port; "
    f"print(port.IsMklEnabled(), os.environ['{ONEDNN_ENV}'])"
)


def start_stage_process(**env: str) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k != ONEDNN_ENV}
    return subprocess.Popen(
        [sys.executable, "-c", STAGE_PROCESS],
        cwd=ROOT,
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_onednn_kernels_are_on_in_the_package_processes_unless_the_user_said_otherwise():
    by_default, user_off, user_on = (
        start_stage_process(),
        start_stage_process(**{ONEDNN_ENV: "0"}),
        start_stage_process(**{ONEDNN_ENV: "1"}),
    )  # three processes at once: each pays TensorFlow's import
    reports = [p.communicate(timeout=300) for p in (by_default, user_off, user_on)]
    assert [p.returncode for p in (by_default, user_off, user_on)] == [0, 0, 0], reports
    last_lines = [out.strip().splitlines()[-1] for out, _ in reports]
    assert last_lines == ["True 1", "False 0", "True 1"]
