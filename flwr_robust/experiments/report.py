"""The report of an experiment, computed from its rows only.

Reads ``rounds.jsonl`` (one row per finished run and round), ``runs.jsonl`` (one row per
attempted run) and, when present, ``experiment.json`` of an output directory, and writes:

- ``plots/accuracy_<attack>_<partitioning>.png``: test accuracy per round, a line per defence
  (mean over seeds, a band of the 95% confidence interval when there are several), a panel
  per Byzantine fraction; a second row of panels with the attack success rate for backdoor attacks;
- ``plots/final_accuracy_<partitioning>.png``: final accuracy heatmap, defence x attack;
- ``plots/asr_<attack>.png``: final backdoor attack success rate heatmap, defence x
  partitioning, for every attack whose rows carry an attack success rate;
- ``summary.md``: per partitioning, an overview (final accuracy per defence x attack, with the
  ASR for backdoor attacks; in bold the best defence of each column and those statistically
  indistinguishable from it) and a detailed table (accuracy, ASR, detection precision/recall),
  every value the mean over seeds with its 95% confidence interval, run times and the failed
  cells.

Run alone on an existing output directory: ``python -m flwr_robust.experiments.report OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .grid import partition_label

Row = dict[str, Any]
#: Key of a group of runs that differ only in their seed.
GroupKey = tuple[str, str, str, float]  # partitioning, defence, attack, fraction
SUMMARY, PLOTS = "summary.md", "plots"
LEGEND = (
    "Values are those of the final round: the mean over seeds ± the half-width of its 95% "
    "confidence interval (Student's t, where there are several seeds). In the overview, bold "
    "marks the best defence of each column (highest accuracy; lowest ASR) and every defence "
    "not significantly different from it (Welch's t-test, two-sided, p ≥ 0.05; with one seed "
    "only the best). "
    "ASR: backdoor attack success rate (share of triggered test inputs of non-target classes "
    "classified as the target). Precision/recall: the rule's rejections against the true "
    "Byzantine clients, averaged over the rounds where defined (— where no client was "
    "rejected or none was Byzantine)."
)


def run_metrics(rows: Sequence[Row]) -> Row:
    """Final metrics of one run from its round rows: the last round's accuracy, loss and
    attack success rate, and detection precision/recall averaged over the rounds where they
    are defined (``None`` where nothing is defined)."""
    ordered = sorted(rows, key=lambda r: r["round"])
    last = ordered[-1] if ordered else {}

    def mean_of(key: str) -> float | None:
        values = [r[key] for r in ordered if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {
        "rounds": last.get("round"),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "final_asr": last.get("attack_success_rate"),
        "mean_precision": mean_of("precision"),
        "mean_recall": mean_of("recall"),
    }


def read_jsonl(path: Path) -> list[Row]:
    """The JSON objects of a JSON-lines file (none if it is missing); reading stops at a
    truncated last line."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def partition_of(row: Row) -> str:
    """The row's partitioning label."""
    return partition_label(row["partitioner"], row.get("alpha"))


def unique(values: Sequence[Any]) -> list[Any]:
    """``values`` without repeats, in order of first appearance."""
    return list(dict.fromkeys(values))


@dataclass
class Group:
    """The runs of one defence x attack x fraction x partitioning (one per seed)."""

    n_byzantine: int
    runs: list[Row] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        """The defined values of metric ``key`` across the runs."""
        return [r[key] for r in self.runs if r.get(key) is not None]

    def mean(self, key: str) -> float:
        """Mean of ``key`` over the runs (NaN when undefined)."""
        values = self.values(key)
        return float(np.mean(values)) if values else math.nan

    def text(self, key: str, digits: int = 3) -> str:
        """``mean ± h`` of ``key`` (``h`` the half-width of the 95% confidence interval over
        seeds), the mean alone for one run, or ``—`` when undefined."""
        values = self.values(key)
        if not values:
            return "—"
        mean, half_width = confidence_interval(values)
        if len(values) == 1:
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {half_width:.{digits}f}"


@dataclass
class Results:
    """Runs of an experiment grouped for the report, in the order of the rows."""

    runs: list[Row]
    groups: dict[GroupKey, Group]
    partitionings: list[str]
    defences: list[str]
    attacks: list[str]
    fractions: dict[str, list[float]]  # attack -> its fractions
    backdoor_attacks: list[str]
    series: dict[GroupKey, list[Row]]  # the round rows of each group

    @classmethod
    def from_rows(cls, rounds: Sequence[Row], runs: Sequence[Row] = ()) -> Results:
        """Group the round rows per run (``cell``) and the runs per seedless key."""
        per_cell: dict[str, list[Row]] = defaultdict(list)
        series: dict[GroupKey, list[Row]] = defaultdict(list)
        for row in rounds:
            per_cell[row["cell"]].append(row)
            series[(partition_of(row), row["defence"], row["attack"], row["fraction"])].append(row)
        groups: dict[GroupKey, Group] = {}
        for cell_rows in per_cell.values():
            first = cell_rows[0]
            key = (partition_of(first), first["defence"], first["attack"], first["fraction"])
            group = groups.setdefault(key, Group(first["n_byzantine"]))
            group.runs.append({**first, **run_metrics(cell_rows)})
        fractions: dict[str, list[float]] = defaultdict(list)
        for _, _, attack, fraction in groups:
            if fraction not in fractions[attack]:
                fractions[attack].append(fraction)
        backdoor = unique(
            [r["attack"] for r in rounds if r.get("attack_success_rate") is not None]
        )
        return cls(
            runs=list(runs), groups=groups,
            partitionings=unique([k[0] for k in groups]), defences=unique([k[1] for k in groups]),
            attacks=unique([k[2] for k in groups]), fractions=dict(fractions),
            backdoor_attacks=backdoor, series=dict(series),
        )

    def columns(self) -> list[tuple[str, float]]:
        """(attack, fraction) pairs in order: the columns of the overview tables."""
        return [(a, f) for a in self.attacks for f in self.fractions[a]]

    def column_label(self, attack: str, fraction: float) -> str:
        """``attack``, or ``attack f=0.2`` when the attack runs at several fractions."""
        return attack if len(self.fractions[attack]) == 1 else f"{attack} f={fraction:g}"

    def failed(self) -> list[Row]:
        """Run rows of cells whose last attempt failed."""
        return [r for r in self.runs if not r.get("ok")]


def load(output: Path) -> tuple[Results, dict[str, Any]]:
    """The results and the experiment metadata (possibly empty) of an output directory."""
    rounds = read_jsonl(output / "rounds.jsonl")
    runs = read_jsonl(output / "runs.jsonl")
    meta_path = output / "experiment.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    return Results.from_rows(rounds, runs), meta


# ---------------------------------------------------------------------------------- plots
def _figure(**kwargs: Any) -> Any:
    """A matplotlib figure outside pyplot (no global state; PNGs render with Agg)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation over seeds (0 for a single value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


#: Confidence level of every interval of the report.
CONFIDENCE = 0.95
#: Significance level of the "indistinguishable from the best" marks.
ALPHA = 0.05


def confidence_interval(values: Sequence[float], level: float = CONFIDENCE) -> tuple[float, float]:
    """The mean of ``values`` and the half-width of its Student-t confidence interval
    (``t_{(1+level)/2, k-1} * s / sqrt(k)`` over ``k`` seeds; 0 for a single value, where no
    interval exists: the report then shows the mean alone)."""
    from scipy.stats import t

    k = len(values)
    if k == 0:
        raise ValueError("no values")
    mean = float(np.mean(values))
    if k == 1:
        return mean, 0.0
    return mean, float(t.ppf((1 + level) / 2, k - 1) * _std(values) / math.sqrt(k))


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test of equal means (at least 2 values per group, not
    both constant): ``t = (m_a - m_b) / sqrt(s_a^2/k_a + s_b^2/k_b)`` with Welch-Satterthwaite
    degrees of freedom. A group constant up to rounding counts as exactly constant."""
    from scipy.stats import t

    va, vb = (0.0 if _constant(v) else _std(v) ** 2 / len(v) for v in (a, b))
    statistic = abs(float(np.mean(a)) - float(np.mean(b))) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(2 * t.sf(statistic, dof))


def indistinguishable(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> bool:
    """Whether the means of two groups of seeds do not differ significantly
    (:func:`welch_p_value` ``>= alpha``). Groups without spread differ iff their means do; a
    group of one seed supports no test, so only equal means count as indistinguishable."""
    if not a or not b:
        return False
    if len(a) < 2 or len(b) < 2 or (_constant(a) and _constant(b)):
        return bool(np.isclose(np.mean(a), np.mean(b), rtol=1e-9, atol=1e-12))
    return welch_p_value(a, b) >= alpha


def _constant(values: Sequence[float]) -> bool:
    """Whether the values are equal up to rounding (Welch's test is undefined then)."""
    return bool(np.ptp(values) <= 1e-12 * max(1.0, float(np.max(np.abs(values)))))


def best_marks(groups: dict[str, Group], key: str, *, highest: bool) -> set[str]:
    """The names among ``groups`` whose ``key`` is the best mean (highest or lowest) or not
    significantly different from it (:func:`indistinguishable`)."""
    defined = {name: g.values(key) for name, g in groups.items() if g.values(key)}
    if not defined:
        return set()
    means = {name: float(np.mean(v)) for name, v in defined.items()}
    best = (max if highest else min)(means, key=lambda name: (means[name], name))
    return {name for name, v in defined.items() if indistinguishable(defined[best], v)}


def plot_curves(results: Results, attack: str, partition: str, path: Path) -> None:
    """Accuracy (and ASR for backdoor attacks) per round, a line per defence."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    fractions = results.fractions[attack]
    metrics = ["accuracy"] + (["attack_success_rate"] if attack in results.backdoor_attacks
                              else [])
    fig = _figure(figsize=(5.5 * len(fractions), 3.8 * len(metrics)))
    axes = fig.subplots(len(metrics), len(fractions), squeeze=False, sharey="row")
    colours = colormaps["tab20" if len(results.defences) > 10 else "tab10"].colors
    for col, fraction in enumerate(fractions):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            ax.set_prop_cycle(color=colours)
            for defence in results.defences:
                series: dict[int, list[float]] = defaultdict(list)
                for r in results.series.get((partition, defence, attack, fraction), []):
                    if r.get(metric) is not None:
                        series[r["round"]].append(r[metric])
                if not series:
                    continue
                xs = sorted(series)
                means, widths = np.array([confidence_interval(series[x]) for x in xs]).T
                (line,) = ax.plot(xs, means, marker="o", markersize=3, label=defence)
                if any(len(series[x]) > 1 for x in xs):
                    ax.fill_between(xs, means - widths, means + widths, alpha=0.15,
                                    color=line.get_color())
            name = "accuracy" if metric == "accuracy" else "attack success rate"
            threat = f"{attack} (f={fraction:g})" if fraction else attack
            ax.set_title(f"{threat}, {partition}: {name}", fontsize=10)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(name)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_heatmap(
    matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, cmap: str,
    path: Path,
) -> None:
    """An annotated heatmap of values in [0, 1] (NaN shown as ``n/a``)."""
    fig = _figure(figsize=(1.6 + 1.3 * len(cols), 1.0 + 0.45 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0,
                      aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            value = matrix[i, j]
            text = "n/a" if math.isnan(value) else f"{value:.2f}"
            dark = not math.isnan(value) and (value < 0.5) == (cmap == "viridis")
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_plots(results: Results, directory: Path) -> list[Path]:
    """Every figure of the report; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for attack in results.attacks:
        for partition in results.partitionings:
            path = directory / f"accuracy_{attack}_{partition}.png"
            plot_curves(results, attack, partition, path)
            paths.append(path)
    columns = results.columns()
    labels = [results.column_label(a, f) for a, f in columns]
    for partition in results.partitionings:
        matrix = np.array([
            [_group_mean(results, (partition, d, a, f), "final_accuracy") for a, f in columns]
            for d in results.defences
        ])
        path = directory / f"final_accuracy_{partition}.png"
        plot_heatmap(matrix, results.defences, labels, f"final accuracy ({partition})",
                     "viridis", path)
        paths.append(path)
    for attack in results.backdoor_attacks:
        cols = [(p, f) for p in results.partitionings for f in results.fractions[attack]]
        names = [p if len(results.fractions[attack]) == 1 else f"{p} f={f:g}" for p, f in cols]
        matrix = np.array([
            [_group_mean(results, (p, d, attack, f), "final_asr") for p, f in cols]
            for d in results.defences
        ])
        path = directory / f"asr_{attack}.png"
        plot_heatmap(matrix, results.defences, names,
                     f"{attack}: final attack success rate", "Reds", path)
        paths.append(path)
    return paths


def _group_mean(results: Results, key: GroupKey, metric: str) -> float:
    group = results.groups.get(key)
    return math.nan if group is None else group.mean(metric)


# -------------------------------------------------------------------------------- summary
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows), ""]


def summary_markdown(results: Results, meta: dict[str, Any], plots: Sequence[Path]) -> str:
    """The Markdown summary (tables, figure links, failed cells)."""
    finished = [run for group in results.groups.values() for run in group.runs]
    seeds = unique([r["seed"] for r in finished])
    title = meta.get("name", "experiment")
    lines = [f"# Experiment `{title}`: defences x attacks", ""]
    facts = []
    if "clients" in meta:
        facts.append(f"{meta['clients']} clients, {meta['rounds']} rounds")
    facts.append(f"seeds {', '.join(map(str, seeds)) or '—'}")
    status = f"{len(finished)} runs finished, {len(results.failed())} failed"
    if "cells" in meta:
        status += f", {meta['cells'] - len(finished) - len(results.failed())} not run yet " \
                  f"(of {meta['cells']} cells)"
    facts.append(status)
    seconds = [r["seconds"] for r in results.runs if r.get("ok") and r.get("seconds")]
    if seconds:
        facts.append(f"run time {sum(seconds) / 60:.1f} min ({np.mean(seconds):.0f} s per run)")
    lines += ["; ".join(facts) + ".", "", LEGEND, ""]
    for partition in results.partitionings:
        legend = " (backdoor columns: accuracy / ASR)" if results.backdoor_attacks else ""
        lines += [f"## {partition}", "", f"Final accuracy{legend}:", ""]
        header = ["defence", *(results.column_label(a, f) for a, f in results.columns())]
        columns = []
        for attack, fraction in results.columns():
            column = {d: results.groups[(partition, d, attack, fraction)]
                      for d in results.defences
                      if (partition, d, attack, fraction) in results.groups}
            columns.append((attack, column, best_marks(column, "final_accuracy", highest=True),
                            best_marks(column, "final_asr", highest=False)))
        rows = []
        for defence in results.defences:
            cells = [defence]
            for attack, column, best_accuracy, best_asr in columns:
                group = column.get(defence)
                if group is None:
                    cells.append("—")
                    continue
                text = _marked(group.text("final_accuracy"), defence in best_accuracy)
                if attack in results.backdoor_attacks:
                    text += f" / {_marked(group.text('final_asr'), defence in best_asr)}"
                cells.append(text)
            rows.append(cells)
        lines += _table(header, rows)
        lines += ["Details:", ""] + _detail_table(results, partition)
        lines += [f"![final accuracy, {partition}]({PLOTS}/final_accuracy_{partition}.png)", ""]
    if results.backdoor_attacks:
        lines += ["## Backdoor attack success rate", ""]
        lines += [f"![{a}]({PLOTS}/asr_{a}.png)" for a in results.backdoor_attacks] + [""]
    curves = [p for p in plots if p.name.startswith("accuracy_")]
    if curves:
        lines += ["## Accuracy per round", ""]
        lines += [f"![{p.stem}]({PLOTS}/{p.name})" for p in curves] + [""]
    failed = results.failed()
    if failed:
        lines += ["## Failed cells", "",
                  "These runs failed; rerunning the experiment retries them.", ""]
        lines += _table(
            ["cell", "status", "details", "seconds", "log"],
            [[r["cell"], r.get("status", ""), " ".join(str(r.get("details", "")).split())[:300],
              f"{r.get('seconds', 0):.0f}", r.get("log", "")] for r in failed],
        )
    return "\n".join(lines)


def _marked(text: str, bold: bool) -> str:
    return f"**{text}**" if bold and text != "—" else text


def _detail_table(results: Results, partition: str) -> list[str]:
    keys = [k for k in results.groups if k[0] == partition]
    has_asr = any(results.groups[k].values("final_asr") for k in keys)
    has_detection = any(
        results.groups[k].values("mean_precision") or results.groups[k].values("mean_recall")
        for k in keys
    )
    header = ["defence", "attack", "Byzantine", "accuracy"]
    header += ["ASR"] * has_asr + ["precision", "recall"] * has_detection + ["seeds"]
    rows = []
    for attack, fraction in results.columns():
        for defence in results.defences:
            group = results.groups.get((partition, defence, attack, fraction))
            if group is None:
                continue
            row = [defence, attack, f"{fraction:g} ({group.n_byzantine})",
                   group.text("final_accuracy")]
            row += [group.text("final_asr")] * has_asr
            if has_detection:
                row += [group.text("mean_precision", 2), group.text("mean_recall", 2)]
            rows.append([*row, str(len(group.runs))])
    return _table(header, rows)


def generate_report(output: Path) -> list[Path]:
    """Write the plots and ``summary.md`` of the output directory ``output``; returns the
    paths written. Raises ``ValueError`` when it holds no finished run."""
    results, meta = load(output)
    if not results.groups and not results.failed():
        raise ValueError(f"{output} holds no results (rounds.jsonl / runs.jsonl)")
    plots = write_plots(results, output / PLOTS) if results.groups else []
    summary = output / SUMMARY
    summary.write_text(summary_markdown(results, meta, plots), encoding="utf-8")
    return [*plots, summary]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flwr_robust.experiments.report OUT``."""
    parser = argparse.ArgumentParser(
        prog="python -m flwr_robust.experiments.report",
        description="Write the plots and summary.md of an experiment output directory.",
    )
    parser.add_argument("output", type=Path, metavar="OUT", help="experiment output directory")
    args = parser.parse_args(argv)
    try:
        paths = generate_report(args.output)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} files; summary: {args.output / SUMMARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
