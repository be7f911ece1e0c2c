"""What the benchmarks print about the machine: the CPU's model, cores and the vector flags
that decide which kernels TensorFlow (oneDNN) and OpenVINO run, and ONEDNN_MAX_CPU_ISA when
it caps them, and TF_ENABLE_ONEDNN_OPTS (whether TensorFlow runs its oneDNN kernels: the
package turns them on, `pipeline/tensorflow_start.py`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_description() -> str:
    """e.g. 'Intel(R) Xeon(R) Processor, 2 CPUs, avx2 avx512f avx512_bf16 avx512_vnni'."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.is_file() else ""
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    have = [f for f in CPU_FLAGS if f in flags] or ["none of " + ", ".join(CPU_FLAGS)]
    settings = [
        f"{key}={os.environ[key]}"
        for key in ("ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS")
        if key in os.environ
    ]
    return f"{name.group(1) if name else 'unknown CPU'}, {os.cpu_count()} CPUs, " + "; ".join(
        [" ".join(have), *settings]
    )
