"""MkDocs hook: each `<!-- benchmark: NAME -->` marker becomes the table of
`benchmarks/results/NAME.json`, the file the benchmark wrote when it last ran
(`benchmarks/results.py`), with the command, commit, date and machine it was measured on.
A new measurement is a change of data, never an edit of prose."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"<!-- benchmark: ([\w.-]+) -->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = Path(config["config_file_path"]).parent
    return MARKER.sub(lambda m: benchmark_table(root, m.group(1), page.file.src_path), markdown)


def benchmark_table(root: Path, name: str, page: str) -> str:
    path = root / "benchmarks" / "results" / f"{name}.json"
    if not path.is_file():
        raise PluginError(
            f"{page}: <!-- benchmark: {name} --> needs {path.relative_to(root)}, which the "
            f"benchmark writes when it runs (benchmarks/{name.split('.')[0]}.py)"
        )
    results = json.loads(path.read_text())
    columns = results["columns"]
    lines = [
        f"*Rendered from `{path.relative_to(root)}`: `{results['command']}`, measured "
        f"{results['measured']} on commit {results['commit']}; CPU: {results['cpu']}; "
        + ", ".join(f"{lib} {v}" for lib, v in results["versions"].items())
        + ".*",
        "",
        results["description"],
        "",
        "| " + " | ".join(c["heading"] for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cells(row, columns)) + " |" for row in results["rows"]]
    if results.get("notes"):
        lines += ["", results["notes"]]
    return "\n".join(lines)


def cells(row: dict, columns: list[dict]) -> list[str]:
    """A row's cells in the columns' formats (a format spec, or `code`); a row that failed
    shows its error in the first column it has no value for."""
    out, error = [], row.get("error")
    for column in columns:
        value = row.get(column["key"])
        if value is None:
            out.append(f"fails: {error}" if error else "")
            error = None
        elif column["format"] == "code":  # a setting (key=value) as code, words as words
            out.append(f"`{value}`" if "=" in str(value) else str(value))
        elif column["format"] and isinstance(value, int | float):
            out.append(format(value, column["format"]))
        else:
            out.append(str(value))
    return out
