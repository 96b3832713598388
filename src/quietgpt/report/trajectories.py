"""The report's "Outliers through training" section: the trajectories figure, how they were measured, and when
each variant first crossed the emergence thresholds (results.json's "trajectories", study/results.py)."""

from __future__ import annotations

from pathlib import Path

from quietgpt.report.plots import plot_trajectories

PLOT = "trajectories.png"


def trajectory_section(results: dict, data: list[dict], plot_dir: Path) -> list[tuple]:
    """The section's blocks (document.py's kinds), drawing plots/trajectories.png from the runs' `data`
    (report._run_data); [] when the study measured no trajectories."""
    traj = results.get("trajectories")
    if not traj:
        return []
    variants = list(results.get("config", {}).get("variants", []))
    metrics = traj.get("metrics", {})
    order = [k for k in traj.get("order", metrics) if k in metrics]
    thresholds = {e["metric"]: e["threshold"] for e in traj.get("emergence", []) if e.get("threshold") is not None}
    drawn = plot_trajectories(data, variants, [(k, metrics[k].get("label", k)) for k in order],
                              plot_dir / PLOT, thresholds)
    interval, every = traj.get("interval") or 0, traj.get("quant_every") or 0
    quant = (f"every {interval * every} iterations also the quantized perplexity ratios "
             f"({', '.join(traj['quant'])}, calibrated on {traj.get('calib_batches')} fixed training batches) on "
             "those windows" if traj.get("quant") and every else "no quantized ratios")
    blocks: list[tuple] = [
        ("h2", "Outliers through training"),
        ("p", f"Every {interval} iterations (and after the last) each run measured the registry's trajectory "
              f"metrics on the same {traj.get('sequences')} validation windows (the same for every variant and "
              f"seed); {quant}. Each point follows its metric's definition (see Definitions); the last point is "
              "the final measurement's definition on fewer windows, so it can differ from the summary table. "
              "The rows '..., mean over training' in the tables (auc_<metric> in results.csv) are each "
              "trajectory's area divided by its iteration span (its mean level over training), compared paired "
              "by seed like the final-step metrics."),
    ]
    if drawn:
        blocks.append(("img", f"plots/{PLOT}", "Outliers through training per variant: mean over seeds, band = "
                                                "min..max over seeds; dashed: emergence threshold."))
    blocks += [("p", "When the problems appear (seed-mean trajectory above the threshold):"),
               ("ul", [e["text"] for e in traj.get("emergence", [])])]
    return blocks


def insert_section(blocks: list[tuple], section: list[tuple], before: tuple[str, ...] = ("Failed runs",)
                   ) -> list[tuple]:
    """`blocks` with `section` inserted before the first h2 titled one of `before`, else before the first
    folded ("details") block: after the answer, the forest plot and the effects table (else at the end)."""
    for title in before:
        for i, b in enumerate(blocks):
            if b[0] == "h2" and b[1] == title:
                return [*blocks[:i], *section, *blocks[i:]]
    for i, b in enumerate(blocks):
        if b[0] == "details":
            return [*blocks[:i], *section, *blocks[i:]]
    return [*blocks, *section]
