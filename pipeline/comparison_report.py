"""What the comparison looks like: its markdown table, figure and JSON (stage `compare`)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.evaluate import SCORES  # noqa: E402


def json_safe(value):
    """NaN (a score a row does not have) as null: strict JSON parsers reject NaN."""
    return None if isinstance(value, float) and np.isnan(value) else value


def number(fmt: str):
    """A cell formatter that shows a missing value (a baseline's costs) as a dash."""
    return lambda v: "—" if pd.isna(v) else fmt.format(v)


def markdown_table(
    table: pd.DataFrame, classes: list[str], confidence: float, metric: str = "macro_f1"
) -> str:
    """Validation score (the ranking), test scores as `value [low, high]`, per-class F1,
    costs, flags."""
    shown = pd.DataFrame({"model": table["model"]})
    shown[f"val {metric} (ranks)"] = table[f"val_{metric}"].map(number("{:.3f}"))
    for score in SCORES:
        shown[f"{score} ({confidence:.0%} CI)"] = [
            f"{r[score]:.3f} [{r[score + '_low']:.2f}, {r[score + '_high']:.2f}]"
            for r in table.to_dict("records")
        ]
    if table["seeds"].notna().any():
        metric = "macro_f1"
        shown[f"{metric} over seeds"] = [
            f"{r[metric + '_mean']:.3f} ± {r[metric + '_std']:.3f} ({r['seeds']:.0f})"
            if pd.notna(r["seeds"])
            else ""
            for r in table.to_dict("records")
        ]
    for c in classes:
        shown[f"F1 {c}"] = table[f"f1_{c}"].map("{:.2f}".format)
    shown["params"] = table["params"].map(number("{:,.0f}"))
    shown["train s"] = table["train_time_s"].map(number("{:.0f}"))
    shown["ms/clip"] = table["inference_ms_per_clip"].map(number("{:.0f}"))
    shown["test clips"] = table["test_clips"]
    shown["flags"] = table["flags"]
    notes = [
        f"\n\n{r['model']}: the members' probabilities averaged ({r['pooling']} mean), "
        f"weights {r['weights']}"
        for r in table.to_dict("records")
        if r.get("kind") == "ensemble"
    ]
    return shown.to_markdown(index=False, disable_numparse=True) + "".join(notes)


def comparison_figure(table: pd.DataFrame, classes: list[str], confidence: float):
    """Left: the three scores with their intervals and the chance line; right: F1 per class."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 3]})
    left.axhline(
        1 / len(classes),
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"chance (balanced) 1/{len(classes)}",
    )
    width = 0.8 / len(SCORES)
    x = np.arange(len(table))
    for i, score in enumerate(SCORES):
        err = np.vstack(
            [table[score] - table[f"{score}_low"], table[f"{score}_high"] - table[score]]
        )
        left.bar(x + i * width, table[score], width, yerr=err.clip(min=0), capsize=3, label=score)
    left.set_xticks(x + width, table["model"])
    left.set_ylim(0, 1)
    left.set_ylabel("test score")
    left.set_title(f"Test scores ({confidence:.0%} bootstrap intervals)")
    left.legend(loc="upper right", fontsize=7)
    width = 0.8 / len(table)
    cx = np.arange(len(classes))
    for i, row in enumerate(table.to_dict("records")):
        right.bar(cx + i * width, [row[f"f1_{c}"] for c in classes], width, label=row["model"])
    right.set_xticks(cx + width * (len(table) - 1) / 2, classes, rotation=30, ha="right")
    right.set_ylim(0, 1)
    right.set_title("F1 per class")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig
