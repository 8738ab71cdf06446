"""Rendering: markdown for Dagster, PNG plots, a self-contained HTML report."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from keel.evaluation.metrics import QUALITY_METRICS
from keel.reporting import (
    data_uri,
    format_value,
    html_table,
    markdown_table,
    new_figure,
    png_bytes,
)

Table = tuple[list[str], list[list[Any]]]
_GROUP_COLUMNS = ("group", "count", "positives", "selection_rate", "tpr", "fpr", "judged")
_SERVING_COLUMNS = ("latency_p50_ms", "latency_p99_ms", "throughput_rows_per_s", "size_bytes")
_DIFFERENCES = ("demographic_parity_difference", "equalized_odds_difference")
_SPEEDUPS = ("single-row speed-up", "batch speed-up", "size ratio")
_VARIANT_COLUMNS = (
    "variant",
    "roc_auc",
    "auc_change",
    "latency_p50_ms",
    "latency_p99_ms",
    "throughput_rows_per_s",
    "single_row_speedup",
    "batch_speedup",
    "size_ratio",
)


def _pick(mapping: Mapping[str, Any], keys: Sequence[str]) -> list[Any]:
    return [mapping[key] for key in keys]


def _differences(result: Mapping[str, Any]) -> list[str | None]:
    """Each disparity difference with its bootstrap interval, as text."""
    if result["intervals"] is None:
        return [None, None]
    return [
        f"{result[name]:.4f} [{result['intervals'][name][0]:.4f}, "
        f"{result['intervals'][name][1]:.4f}]"
        for name in _DIFFERENCES
    ]


def report_tables(summary: Mapping[str, Any]) -> dict[str, Table]:
    """Headers and rows of every table in the report, shared by the markdown and the HTML."""
    challenger, champion = summary["challenger"], summary["champion"]
    models = [("challenger", challenger)] + ([("champion", champion)] if champion else [])
    tables: dict[str, Table] = {
        "gates": (
            ["gate", "result", "detail"],
            [[g["name"], "PASS" if g["passed"] else "FAIL", g["detail"]] for g in summary["gates"]],
        )
    }
    quality_rows = []
    for name in (*QUALITY_METRICS, "threshold"):
        row = [name]
        for _, model in models:
            row.append(
                model["threshold"]["value"] if name == "threshold" else model["quality"][name]
            )
        if champion:
            row.append(summary["comparison"]["deltas"].get(name))
        quality_rows.append(row)
    tables["quality"] = (
        ["metric", *(label for label, _ in models)] + (["difference"] if champion else []),
        quality_rows,
    )
    tables["calibration"] = (
        ["bin", *(f"{label} rows / predicted / observed" for label, _ in models)],
        [
            [row["bin"]]
            + [
                f"{m['quality']['reliability'][i]['count']} / "
                f"{format_value(m['quality']['reliability'][i]['mean_predicted'])} / "
                f"{format_value(m['quality']['reliability'][i]['observed_rate'])}"
                for _, m in models
            ]
            for i, row in enumerate(challenger["quality"]["reliability"])
        ],
    )
    fairness_rows = []
    for attribute, result in challenger["fairness"].items():
        fairness_rows += [[attribute, *_pick(g, _GROUP_COLUMNS)] for g in result["groups"]]
        fairness_rows.append(
            [attribute, "difference", None, None, *_differences(result), None, None]
        )
    tables["fairness"] = (
        ["attribute", "group", "rows", "defaults", "selection rate", "TPR", "FPR", "judged"],
        fairness_rows,
    )
    tables["serving"] = (
        ["model", "p50 ms", "p99 ms", "rows/s", "size MB"],
        [
            [label, *_pick(m["serving"], _SERVING_COLUMNS[:3]), m["serving"]["size_bytes"] / 2**20]
            for label, m in models
        ],
    )
    if summary["variants"]:
        tables["variants"] = (
            ["variant", "ROC AUC", "AUC change", "p50 ms", "p99 ms", "rows/s", *_SPEEDUPS],
            [_pick(v, _VARIANT_COLUMNS) for v in summary["variants"]],
        )
    tables["policy"] = (["setting", "value"], [[k, v] for k, v in summary["policy"].items()])
    return tables


def report_notes(summary: Mapping[str, Any]) -> dict[str, str]:
    """Sentences that go under some tables: the threshold, the AUC interval, the fairness rows."""
    challenger, champion = summary["challenger"], summary["champion"]
    quality = f"Decision threshold: {challenger['threshold']['how']}."
    if champion:
        auc = summary["comparison"]["auc"]
        quality += (
            f" Champion threshold: {champion['threshold']['how']}."
            f" AUC difference {auc['difference']:+.4f}, {auc['confidence']:.0%} paired bootstrap"
            f" interval [{auc['low']:+.4f}, {auc['high']:+.4f}] over {auc['samples']} resamples;"
            f" challenger better in {auc['share_challenger_better']:.1%} of them."
        )
    return {
        "quality": quality,
        "fairness": (
            "Difference rows: demographic parity difference under selection rate, equalized "
            "odds difference under TPR, each with its bootstrap interval; groups marked "
            "judged=no are too small to count."
        ),
    }


def markdown_tables(summary: Mapping[str, Any]) -> dict[str, str]:
    """The report's key tables as markdown for Dagster metadata."""
    notes = report_notes(summary)
    return {
        name: markdown_table(*table) + (f"\n\n{notes[name]}" if name in notes else "")
        for name, table in report_tables(summary).items()
        if name not in ("calibration", "policy")
    }


def plots(
    summary: Mapping[str, Any],
    labels: np.ndarray,
    challenger_scores: np.ndarray,
    champion_scores: np.ndarray | None,
) -> dict[str, bytes]:
    """PNG plots: ROC and precision-recall curves, reliability diagram, fairness by group."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    curves = [("challenger", challenger_scores)]
    if champion_scores is not None:
        curves.append(("champion", champion_scores))
    figure = new_figure(9, 4)
    roc_axis, pr_axis = figure.subplots(1, 2)
    for name, scores in curves:
        fpr, tpr, _ = roc_curve(labels, scores)
        roc_axis.plot(fpr, tpr, label=name)
        precision, recall, _ = precision_recall_curve(labels, scores)
        pr_axis.plot(recall, precision, label=name)
    roc_axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc_axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_axis.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    roc_axis.legend()
    images = {"curves": png_bytes(figure)}

    figure = new_figure(4.5, 4)
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect")
    for name in ("challenger", "champion"):
        if summary[name] is None:
            continue
        table = [r for r in summary[name]["quality"]["reliability"] if r["count"]]
        axis.plot(
            [r["mean_predicted"] for r in table],
            [r["observed_rate"] for r in table],
            marker="o",
            label=name,
        )
    axis.set(xlabel="mean predicted P(default)", ylabel="observed default rate")
    axis.set_title("Reliability")
    axis.legend()
    images["reliability"] = png_bytes(figure)

    fairness = summary["challenger"]["fairness"]
    figure = new_figure(4 * len(fairness), 3.5)
    axes = figure.subplots(1, len(fairness), squeeze=False)
    for axis, (attribute, result) in zip(axes[0], fairness.items(), strict=True):
        groups = result["groups"]
        x = np.arange(len(groups))
        for offset, metric in ((-0.27, "selection_rate"), (0.0, "tpr"), (0.27, "fpr")):
            axis.bar(x + offset, [g[metric] for g in groups], width=0.27, label=metric)
        axis.set_xticks(x, [g["group"] for g in groups], rotation=30)
        axis.set(title=attribute, ylim=(0, 1))
    axes[0][0].legend(fontsize="small")
    images["fairness"] = png_bytes(figure)
    return images


_REPORT_SECTIONS = (
    ("Gates", "gates", None),
    ("Quality on the held-out window", "quality", "curves"),
    ("Calibration", "calibration", "reliability"),
    ("Fairness by protected attribute", "fairness", "fairness"),
    ("Serving cost", "serving", None),
    ("PyTorch precision variants (FP16, dynamic INT8)", "variants", None),
    ("Policy", "policy", None),
)
_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left}img{max-width:100%}.PASS{color:#17702b;font-weight:bold}"
    ".FAIL{color:#b00020;font-weight:bold}"
)


def html_report(summary: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The whole evaluation as one self-contained HTML page (plots embedded as PNG)."""
    challenger, champion = summary["challenger"], summary["champion"]
    window = summary["window"]
    verdict = "PASS" if summary["all_gates_passed"] else "FAIL"
    champion_text = (
        f"<code>{html.escape(champion['uri'])}</code> ({html.escape(champion['family'])})"
        if champion
        else "none yet: this is the first model, so the absolute gates alone decide"
    )
    parts = [
        f"<h1>Challenger evaluation: <span class={verdict}>{verdict}</span></h1>",
        f"<p>Challenger <code>{html.escape(challenger['uri'])}</code> "
        f"({html.escape(challenger['family'])}); champion {champion_text}.</p>",
        f"<p>Held-out window {html.escape(window['start'])} to {html.escape(window['end'])}: "
        f"{window['rows']:,} rows, {window['defaults']:,} defaults "
        f"({window['default_rate']:.2%}).</p>",
    ]
    tables, notes = report_tables(summary), report_notes(summary)
    for title, name, image in _REPORT_SECTIONS:
        if name not in tables:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if name in notes:
            parts.append(f"<p>{html.escape(notes[name])}</p>")
        table = html_table(*tables[name])
        if name == "gates":
            for word in ("PASS", "FAIL"):
                table = table.replace(f"<td>{word}</td>", f"<td class={word}>{word}</td>")
        parts.append(table)
        if image:
            parts.append(f'<img alt="{name}" src="{data_uri(images[image])}">')
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Keel challenger evaluation"
        f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
