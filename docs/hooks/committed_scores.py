"""MkDocs hook: the table of the committed pipeline run, rendered from `reports/comparison.csv`
(what `dvc repro` wrote and git holds) each time the site is built, in place of the marker
below. A change of these figures is a change of data, never an edit of prose."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

MARKER = "<!-- scores: reports/comparison.csv -->"
ROW_NAMES = {
    "baseline_motion_logreg": "baseline: motion logistic regression",
    "baseline_majority": "baseline: majority class",
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    root = Path(config["config_file_path"]).parent
    return markdown.replace(MARKER, committed_table(root))


def committed_table(root: Path) -> str:
    """The comparison's rows in its order (best validation first): validation and test
    macro-F1 with its 95% interval, test accuracy, the classes predicted, the flags."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    with open(root / "reports" / "comparison.csv", newline="") as table:
        rows = list(csv.DictReader(table))
    lines = [
        f"*Rendered from `reports/comparison.csv` when this site was built: dataset "
        f"`{params['dataset']['name']}`, seed {params['seed']}.*",
        "",
        "| model | val macro-F1 | test macro-F1 [95% CI] | test accuracy | classes predicted "
        "| flags |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        interval = (
            f" [{float(row['macro_f1_low']):.2f}, {float(row['macro_f1_high']):.2f}]"
            if row.get("macro_f1_low")
            else ""
        )
        lines.append(
            f"| {ROW_NAMES.get(row['model'], row['model'])} | {float(row['val_macro_f1']):.3f} "
            f"| {float(row['macro_f1']):.3f}{interval} | {float(row['accuracy']):.3f} "
            f"| {row.get('predicted_classes') or ''} | {row.get('flags') or ''} |"
        )
    return "\n".join(lines)
