"""The documentation site builds with --strict, and --strict does catch what it is there for:
a link to a page that does not exist, a page missing from the navigation. The scores page
shows the committed run's figures, rendered from `reports/comparison.csv` at build time, and
the benchmarks' tables are rendered from the results files the benchmarks write. The README
links only to pages that exist."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from mkdocs.exceptions import PluginError

MKDOCS = Path(sys.executable).parent / "mkdocs"


def build(folder: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=folder,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
    )


def test_the_site_builds_strictly_and_fails_on_a_broken_link_or_a_lost_page(tmp_path):
    proc = build(ROOT, tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "mlflow" / "index.html").is_file()
    # the committed run's table, from the data, not typed
    scores = (tmp_path / "site" / "scores" / "index.html").read_text()
    assert "scores: reports/comparison.csv" not in scores
    with open(ROOT / "reports" / "comparison.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    for row in rows:
        assert f"{float(row['macro_f1']):.3f} [{float(row['macro_f1_low']):.2f}," in scores, row
    # every benchmark marker became its table, and every results file is shown somewhere
    site = "".join(page.read_text() for page in (tmp_path / "site").rglob("index.html"))
    assert "<!-- benchmark: " not in site
    for results in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert f"benchmarks/results/{results.name}" in site, results.name
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy2(ROOT / "mkdocs.yml", copy)
    shutil.copy2(ROOT / "params.yaml", copy)  # what the scores hook reads
    (copy / "reports").mkdir()
    shutil.copy2(ROOT / "reports" / "comparison.csv", copy / "reports")
    shutil.copytree(ROOT / "benchmarks" / "results", copy / "benchmarks" / "results")
    page = copy / "docs" / "tests.md"
    page.write_text(page.read_text() + "\nSee [the old page](removed.md).\n")
    broken = build(copy, tmp_path / "broken")
    assert broken.returncode != 0 and "removed.md" in broken.stderr
    page.write_text((ROOT / "docs" / "tests.md").read_text())
    (copy / "docs" / "orphan.md").write_text("# Not in the navigation\n")
    lost = build(copy, tmp_path / "lost")
    assert lost.returncode != 0 and "orphan.md" in lost.stderr


def test_the_readme_is_a_landing_page_linking_to_pages_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert len(links) >= 10
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing


def benchmark_tables_hook():
    spec = importlib.util.spec_from_file_location(
        "benchmark_tables", ROOT / "docs" / "hooks" / "benchmark_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the benchmark generates the sample and decodes it 3 times, ~18 s; CI runs it
def test_a_benchmark_run_becomes_the_table_in_the_docs(tmp_path):
    """A real (small) run of the frame-extraction benchmark writes its results file; the docs'
    hook renders that file's rows, its figures and the machine they came from."""
    results = tmp_path / "benchmarks" / "results" / "frame_extraction.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frame_extraction.py"), "--sample"]
        + ["--frames", "8", "--size", "32", "--repeats", "1", "--json", str(results)],
        check=True,
        capture_output=True,
        text=True,
    )
    written = json.loads(results.read_text())
    assert [row["side"] for row in written["rows"]] == [
        "sequential OpenCV (reference)",
        "frames stage",
        "frames stage + optical flow (not compared)",
    ]
    assert written["cpu"] and written["commit"] and written["versions"]["opencv-python-headless"]
    hook = benchmark_tables_hook()
    table = hook.benchmark_table(tmp_path, "frame_extraction", "performance.md")
    assert f"Speed-up of the stage: {written['figures']['speedup']:.2f}×" in table
    assert written["cpu"] in table and written["measured"] in table
    for row in written["rows"]:
        assert f"| {row['side']} | {row['seconds']:.2f} | {row['clips_per_s']:.2f} |" in table
    with pytest.raises(PluginError, match="benchmarks/results/training.json"):
        hook.benchmark_table(tmp_path, "training", "performance.md")
