"""What a benchmark leaves behind: its rows, the table they make and the machine they were
measured on, as one JSON file (by default `benchmarks/results/<benchmark>.json`, committed).

The documentation's tables are rendered from these files when the site is built
(`docs/hooks/benchmark_tables.py`): a new measurement is a change of data, not an edit of
prose. Each file says what the table shows (`columns`: the row key, its heading and a Python
format), where it came from (the command, the commit, the date) and on what (the CPU's model
and flags, ONEDNN_MAX_CPU_ISA when set, the libraries' versions)."""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from cpu import cpu_description  # benchmarks/cpu.py, beside this module

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CODE = ("pipeline", "conf", "benchmarks", "params.yaml")  # what a figure depends on
LIBRARIES = ("tensorflow", "keras", "openvino", "opencv-python-headless", "mlflow", "numpy")


@dataclass(frozen=True)
class Column:
    """One column of the rendered table: `key` of each row, its `heading`, and `format`, a
    format spec for a number (`.1f`, `.0%`), `code` for a setting (a `key=value` shown as
    code, anything else as it is), or empty to show it as it is."""

    key: str
    heading: str
    format: str = ""


def default_path(benchmark: str) -> Path:
    return RESULTS_DIR / f"{benchmark}.json"


def save_results(
    path: Path,
    benchmark: str,
    description: str,
    columns: list[Column],
    rows: list[dict],
    notes: str = "",
    **figures,
) -> None:
    """Write the run's results to `path` atomically: `description` says what was measured on
    what input, `notes` how to read the columns, `figures` any single values of the run (the
    CPU's ceiling, a speed-up against its target)."""
    from pipeline.atomic import write_bytes_atomic

    unknown = sorted({c.key for c in columns} - {k for row in rows for k in row})
    if rows and unknown:
        raise ValueError(f"{benchmark}: columns {unknown} are in no row")
    payload = {
        "benchmark": benchmark,
        "command": shlex.join(["python", *sys.argv]),
        "measured": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "cpu": cpu_description(),
        "versions": versions(),
        "description": description,
        "columns": [asdict(c) for c in columns],
        "rows": rows,
        "notes": notes,
        "figures": figures,
    }
    write_bytes_atomic(path, (json.dumps(payload, indent=2, default=float) + "\n").encode())
    print(f"results written to {path}")


def commit() -> str:
    """The checkout's commit, `+changes` when its tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", *CODE, ":(exclude)benchmarks/results"],
            cwd=ROOT,
        ).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" +changes" if dirty else "")


def versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
