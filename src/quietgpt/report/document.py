"""The report as a list of blocks (headings, paragraphs, lists, tables, figures), and its two renderings:
Markdown and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..stats import fmt

QUESTION = ("Does softmax1 attention (exp(x_i) / (1 + sum_j exp(x_j)), \"quiet attention\") remove the outlier "
            "weights and activations that make transformers hard to quantize, and what does it do to quality "
            "and to low-bit quantization?")


# ----------------------------------------------------------------------------- the document


def cell_ci(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    if s.get("ci95_low") is None:
        return f"{fmt(s['mean'])} (n={s['n']}, no CI)"
    d = 3  # enough significant digits to tell the interval's ends apart (ratios near 1 need more)
    while d < 6 and s["ci95_low"] != s["ci95_high"] and fmt(s["ci95_low"], d) == fmt(s["ci95_high"], d):
        d += 1
    return f"{fmt(s['mean'], d)} [{fmt(s['ci95_low'], d)}, {fmt(s['ci95_high'], d)}]"


def build_document(results: dict, plots: list[tuple[str, str]]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("ul", [items]), ("table", header, rows),
    ("img", relative path, caption). Rendered to Markdown and HTML by the functions below."""
    cfg = results.get("config", {})
    run_cfg = cfg.get("run", {})
    variants = cfg.get("arms") or cfg.get("variants", [])  # arms: variant+optimizer when crossed
    metrics = results.get("metrics", {})
    machine = results.get("machine", {})
    runs = results.get("runs", [])
    n_ok = sum(r.get("status") == "ok" for r in runs)
    model = run_cfg.get("model", {})
    train = run_cfg.get("train", {})
    irreducible = [r["irreducible_loss"] for r in runs if isinstance(r.get("irreducible_loss"), int | float)]
    blocks: list[tuple] = [("h1", f"quietgpt study: {cfg.get('preset', '?')}")]
    blocks += [("h2", "Question"), ("p", QUESTION)]
    blocks += [("h2", "Setup"), ("ul", [
        f"study preset: {cfg.get('preset')} (training preset {cfg.get('train_preset')}); "
        f"overrides: {', '.join(f'{k}={v}' for k, v in sorted(cfg.get('overrides', {}).items())) or 'none'}",
        f"variants: {', '.join(variants)}; baseline: {cfg.get('baseline')}",
        f"seeds: {', '.join(str(s) for s in cfg.get('seeds', []))} (paired design: for each seed every variant "
        "starts from the same shared initial weights and sees the same batches in the same order)",
        f"data: {run_cfg.get('data', {}).get('source')} (tokenizer {run_cfg.get('data', {}).get('tokenizer')})"
        + (f"; irreducible loss of the synthetic task {fmt(irreducible[0])} nats/token (a lower bound "
           "for the validation loss; a model that sees only its context window cannot quite reach it)"
           if irreducible else ""),
        f"model: {model.get('n_layer')} layers, {model.get('n_head')} heads, {model.get('n_embd')} wide, "
        f"context {model.get('block_size')}; training: {train.get('max_iters')} iterations of batch "
        f"{train.get('batch_size')}, lr {train.get('learning_rate')}",
        "measurement (metrics.measure, the same for every run): perplexity on "
        + (f"the first {cfg['eval_tokens']} tokens of the validation split; " if cfg.get("eval_tokens")
           else "the whole validation split; ")
        + f"activation and attention statistics on {cfg.get('n_sequences')} validation sequences; quantization "
        f"sweep: {', '.join(cfg.get('quant', [])) or 'none'} (calibrated on {cfg.get('calib_batches')} "
        "training batches)",
        f"machine: {machine.get('cpu')} ({machine.get('cpu_count')} CPUs), {machine.get('gpu') or 'no GPU'}, "
        f"device {machine.get('device')}, {machine.get('platform')}, "
        f"torch {machine.get('torch')}, quietgpt {machine.get('quietgpt')}",
        f"runs: {n_ok} ok of {len(runs)}, {machine.get('jobs', '?')} at a time ({machine.get('launcher', '?')} "
        f"launcher); wall time of the study: {fmt(results.get('wall_s'))} s "
        f"(sum over runs {fmt(sum(r.get('wall_s') or 0 for r in runs))} s)",
    ])]
    summary = results.get("summary", {})
    blocks += [("h2", "Summary (mean [95% CI] over seeds)"),
               ("table", ["metric", *variants],
                [[metrics.get(m, {}).get("label", m),
                  *[cell_ci(summary[m].get(v)) for v in variants]]
                 for m in [*[m for m in results.get("metric_order", []) if m in summary],
                           *[m for m in summary if m not in results.get("metric_order", [])]]])]
    comps = results.get("comparisons", [])
    blocks += [("h2", f"Paired comparisons against {cfg.get('baseline')}"),
               ("p", "Differences are variant minus baseline, paired by seed. The interval is the 95% Student-t "
                     "interval of the per-seed differences; p-values are the paired t-test and the exact "
                     "sign-flip permutation test over all 2^n sign patterns (whose smallest possible two-sided "
                     "p-value is 2/2^n: 0.25 with 3 seeds, so with few seeds it cannot reach 0.05 whatever "
                     "the data). A direction is claimed only when the interval excludes 0."),
               ("table", ["metric", "variant", "diff", "95% CI", "n", "t-test p", "exact p", "verdict"],
                [[metrics.get(c["metric"], {}).get("label", c["metric"]), f"{c['a']} vs {c['b']}",
                  fmt(c.get("diff_mean")), f"{fmt(c.get('ci95_low'))} .. {fmt(c.get('ci95_high'))}",
                  str(c.get("n")), fmt(c.get("p_value"), 2), fmt(c.get("p_exact"), 2), c.get("verdict", "")]
                 for c in comps])]
    blocks += [("h2", "Definitions"), ("ul", [f"{m.get('label', k)} (`{k}`, {m.get('unit', '')}): "
                                               f"{m.get('definition', '')}" + (f" [{m['paper']}]" if m.get("paper")
                                                                                 not in (None, "-") else "")
                                               for k, m in metrics.items()])]
    blocks += [("h2", "Plots")]
    for path, caption in plots:
        blocks.append(("img", path, caption))
    failed = [r for r in runs if r.get("status") != "ok"]
    blocks += [("h2", "Failed runs")]
    if failed:
        blocks.append(("table", ["variant", "seed", "folder", "error"],
                       [[r["variant"], str(r["seed"]), r.get("dir") or "", r.get("error") or ""] for r in failed]))
    else:
        blocks.append(("p", "None: every run finished."))
    return blocks


def _md_text(s: str) -> str:
    # Markdown renderers pass raw HTML through, so data never reaches the page as markup.
    return html.escape(str(s), quote=False)


def _md_cell(s: str) -> str:
    return _md_text(" ".join(str(s).split())).replace("|", "\\|")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out.append(f"# {_md_text(b[1])}\n")
        elif kind == "h2":
            out.append(f"## {_md_text(b[1])}\n")
        elif kind == "p":
            out.append(f"{_md_text(b[1])}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {_md_text(x)}" for x in b[1]) + "\n")
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
                     "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            out.append(f"![{_md_cell(b[2])}]({b[1]})\n\n*{_md_text(b[2])}*\n")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}
figcaption{color:#555;font-size:.9em}"""


def render_html(blocks: list[tuple], study_dir: Path) -> str:
    """One self-contained page: inline CSS, PNGs as base64 data URIs, every data string escaped."""
    e = html.escape
    title = next((b[1] for b in blocks if b[0] == "h1"), "quietgpt study")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((study_dir / b[1]).read_bytes()).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b[2])}">'
                       f"<figcaption>{e(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
