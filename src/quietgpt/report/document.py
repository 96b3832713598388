"""The report as a list of blocks (headings, paragraphs, lists, tables, figures, folded sections), and its
two renderings from the same blocks: Markdown and one self-contained HTML page.

The order is the reading order of someone with ten seconds: the answer (answer.py) and the forest plot
first, then the compact effects table (metric x variant: difference [CI] and one verdict symbol), then
failed runs if any; everything else (setup, means, the full verdict sentences, the other figures,
definitions) is folded into <details> sections, in both renderings.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from quietgpt.report.answer import answer, question
from quietgpt.report.cells import SYMBOL_LEGEND, effect_cell, label, summary_cell
from quietgpt.stats import exact_floor_note, fmt, fmt_interval

# ----------------------------------------------------------------------------- the document


def _metric_order(results: dict, keys) -> list[str]:
    order = results.get("metric_order", [])
    return [*[m for m in order if m in keys], *[m for m in keys if m not in order]]


def _context(results: dict) -> str:
    """One line: what was trained, how often, and how many runs finished."""
    cfg = results.get("config", {})
    run_cfg = cfg.get("run", {})
    model, train = run_cfg.get("model", {}), run_cfg.get("train", {})
    runs = results.get("runs", [])
    n_ok = sum(r.get("status") == "ok" for r in runs)
    return (f"{len(cfg.get('variants', []))} variants x {len(cfg.get('seeds', []))} seeds on "
            f"{run_cfg.get('data', {}).get('source')} data ({model.get('n_layer')} layers, {model.get('n_head')} "
            f"heads, {model.get('n_embd')} wide, context {model.get('block_size')}; {train.get('max_iters')} "
            f"iterations); baseline {cfg.get('baseline')}; {n_ok} of {len(runs)} runs ok. Details are folded "
            "below the effects table.")


def _setup(results: dict) -> list[str]:
    cfg = results.get("config", {})
    run_cfg = cfg.get("run", {})
    machine, runs = results.get("machine", {}), results.get("runs", [])
    model, train = run_cfg.get("model", {}), run_cfg.get("train", {})
    irreducible = [r["irreducible_loss"] for r in runs if isinstance(r.get("irreducible_loss"), int | float)]
    return [
        f"study preset: {cfg.get('preset')} (training preset {cfg.get('train_preset')}); "
        f"overrides: {', '.join(f'{k}={v}' for k, v in sorted(cfg.get('overrides', {}).items())) or 'none'}",
        f"variants: {', '.join(cfg.get('variants', []))}; baseline: {cfg.get('baseline')}",
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
        f"runs: {sum(r.get('status') == 'ok' for r in runs)} ok of {len(runs)}, {machine.get('jobs', '?')} at a "
        f"time ({machine.get('launcher', '?')} launcher); wall time of the study: {fmt(results.get('wall_s'))} s "
        f"(sum over runs {fmt(sum(r.get('wall_s') or 0 for r in runs))} s)",
    ]


def _effects(results: dict) -> tuple[list[str], list[list[str]]]:
    """The compact table: one row per compared metric, one column per fix, 'diff [CI] symbol' cells."""
    cfg, metrics = results.get("config", {}), results.get("metrics", {})
    fixes = [v for v in cfg.get("variants", []) if v != cfg.get("baseline")]
    by = {(c["metric"], c["a"]): c for c in results.get("comparisons", [])}
    rows = [[label(m, metrics.get(m, {})), *[effect_cell(m, by[m, v]) if (m, v) in by else "n/a" for v in fixes]]
            for m in _metric_order(results, {c["metric"] for c in results.get("comparisons", [])})]
    return ["metric", *fixes], rows


def _summary(results: dict) -> list[tuple]:
    variants, metrics = results.get("config", {}).get("variants", []), results.get("metrics", {})
    summary = results.get("summary", {})
    note = ("Quantization penalties in percent: (ppl_q / ppl_fp - 1) x 100. \"CI uninformative\": the 95% t "
            "interval reaches below what the quantity can be (a time below 0 s, a kurtosis below 1), which with "
            "this few seeds says only that the spread is large. \"0 (by construction)\": softmax and gated put "
            "all of every row's weight on keys; the measured 1 - sum is float rounding.")
    return [("p", note), ("table", ["metric", *variants],
                          [[label(m, metrics.get(m, {})),
                            *[summary_cell(m, metrics.get(m, {}), v, summary[m].get(v)) for v in variants]]
                           for m in _metric_order(results, summary)])]


def _comparisons(results: dict) -> list[tuple]:
    metrics, comps = results.get("metrics", {}), results.get("comparisons", [])
    n = min((c.get("n") or 0 for c in comps if c.get("n")), default=0)  # n = 0: a metric neither arm has
    floor = exact_floor_note(n)
    method = ("Differences are variant minus baseline, paired by seed, in the metric's own unit (ratios as "
              "ratios). The interval is the 95% Student-t interval of the per-seed differences; p-values are "
              "the paired t-test, its Holm adjustment over the study's exploratory comparisons (the primary "
              "hypotheses are their own family; structural comparisons are not tested), and the exact "
              "sign-flip permutation test over all 2^n sign patterns (smallest possible two-sided p: 2/2^n"
              + (f"; {floor}" if floor else "") + "). A direction is claimed only when the interval excludes "
              "0, and called a finding only when it survives Holm's correction.")
    table = ("table", ["metric", "variant", "family", "diff [95% CI]", "n", "t-test p", "Holm p", "exact p",
                       "verdict"],
             [[metrics.get(c["metric"], {}).get("label", c["metric"]), f"{c['a']} vs {c['b']}",
               c.get("family", "exploratory"),
               fmt_interval(c["diff_mean"], c.get("ci95_low"), c.get("ci95_high"), signed=True)
               if c.get("diff_mean") is not None else "n/a",
               str(c.get("n")), fmt(c.get("p_value"), 2), fmt(c.get("p_holm"), 2), fmt(c.get("p_exact"), 2),
               c.get("verdict", "")] for c in comps])
    return [("p", method), table]


def confirmatory_blocks(results: dict) -> list[tuple]:
    """The pre-registered hypotheses first: each one's effect [95% CI], its one-sided test's p, Holm p over
    the primary family, the decision and the seeds; where they were fixed; what the seeds could detect."""
    conf = results.get("confirmatory")
    if not conf:
        return []
    labels = {k: m.get("label", k) for k, m in (results.get("metrics") or {}).items()}
    rows = []
    for h in conf.get("hypotheses", []):
        effect = (fmt_interval(h["diff_mean"], h.get("ci95_low"), h.get("ci95_high"), signed=True)
                  if h.get("diff_mean") is not None else "n/a")
        seeds = h.get("seeds") or []
        rows.append([h["name"], f"{h['a']} has a {h['direction']} {labels.get(h['metric'], h['metric'])} than "
                                f"{h['b']}", effect, f"{h['test']}: {fmt(h.get('p'), 2)}"
                     + (f" (smallest possible {fmt(h['p_min'], 2)})" if h.get("p_min") else ""),
                     fmt(h.get("p_holm"), 2), h["decision"].upper(),
                     f"{len(seeds)}: {seeds[0]}..{seeds[-1]}" if seeds else "0"])
    n_h = len(conf.get("hypotheses", []))
    power = []
    for r in conf.get("power") or []:
        if r.get("sd"):
            power.append(f"{r['name']}: with {r['n']} seeds and the observed sd {fmt(r['sd'])} of the paired "
                         f"differences, the one-sided t-test at level {fmt(r['alpha_step'], 2)} detects "
                         + ", ".join(f"{fmt(e, 3)} with {int(float(k) * 100)}% power" for k, e in r["t"].items()
                                     if e is not None))
    return [("h2", "Confirmatory result (pre-registered)"),
            ("p", f"{n_h} primary hypotheses, fixed before the runs, each decided by its own one-sided test and "
                  f"Holm's correction over these {n_h} alone at alpha {fmt(conf.get('alpha'))}: confirmed when "
                  "the Holm p is below alpha; refuted when the 95% interval lies wholly on the other side of 0; "
                  "otherwise not confirmed. " + (conf.get("preregistration_note") or "")),
            ("table", ["", "hypothesis", "difference [95% CI]", "p (one-sided)", "Holm p", "decision", "seeds"],
             rows), *([("ul", power)] if power else [])]


def build_document(results: dict, plots: list[tuple[str, str]], forest: tuple[str, str] | None = None
                   ) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("ul", [items]), ("table", header, rows),
    ("img", relative path, caption), ("details", summary, [blocks]). Rendered by the functions below.
    `forest` is the forest plot (path, caption), shown right after the answer; `plots` are folded."""
    cfg, metrics, runs = results.get("config", {}), results.get("metrics", {}), results.get("runs", [])
    a = answer(results)
    blocks: list[tuple] = [("h1", f"quietgpt study: {cfg.get('preset', '?')}"), ("p", _context(results))]
    blocks += confirmatory_blocks(results)
    blocks += [("h2", "Answer (exploratory)" if results.get("confirmatory") else "Answer"), ("p", question(results)),
               ("ul", [a["short"], a["baseline"]])]
    if forest:
        blocks.append(("img", *forest))
    blocks += [("h2", "Per fix"), ("ul", [*a["fixes"], *([a["power"]] if a["power"] else [])])]
    header, rows = _effects(results)
    blocks += [("h2", f"Effects against {cfg.get('baseline')} (exploratory)"),
               ("p", "Difference to the baseline (variant - baseline, paired by seed) [95% interval]; "
                     "quantization penalties in percentage points; exploratory: these chose nothing in advance "
                     "and confirm nothing (a primary hypothesis is decided in the confirmatory result). "
                     "\"(structural)\": 0 by construction on one side, not tested. " + SYMBOL_LEGEND),
               ("table", header, rows)]
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed:
        blocks += [("h2", "Failed runs"),
                   ("table", ["variant", "seed", "folder", "error"],
                    [[r["variant"], str(r["seed"]), r.get("dir") or "", r.get("error") or ""] for r in failed])]
    defs = [f"{m.get('label', k)} (`{k}`, {m.get('unit', '')}): {m.get('definition', '')}"
            + (f" [{m['paper']}]" if m.get("paper") not in (None, "-") else "") for k, m in metrics.items()]
    blocks += [("details", "Setup", [("ul", _setup(results))]),
               ("details", "Summary: mean [95% CI] over seeds, per variant", _summary(results)),
               ("details", "Every comparison in full: p-values and verdicts (exploratory)", _comparisons(results)),
               ("details", f"Figures ({len(plots)}): " + ", ".join(Path(p).stem.replace("_", " ") for p, _ in plots),
                [("img", p, c) for p, c in plots]),
               ("details", "Definitions", [("ul", defs)])]
    return blocks


# ----------------------------------------------------------------------------- Markdown

_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # what CommonMark would read as raw HTML (a tag, comment, ...)
_ENTITY = re.compile(r"&(?=#?[A-Za-z0-9]+;)")  # what it would read as an entity


def _md_text(s: str) -> str:
    """Data never reaches the page as markup: escape only a '<' that would open a tag and an '&' that
    would start an entity, so 'x > 1' stays readable in the raw file (no '&gt;' soup)."""
    return _TAG_START.sub("&lt;", _ENTITY.sub("&amp;", str(s)))


def _md_cell(s: str) -> str:
    return _md_text(" ".join(str(s).split())).replace("|", "\\|")


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(s).lower()).strip("-")[:40] or "section"


def render_markdown(blocks: list[tuple]) -> str:
    """GitHub-flavoured Markdown; folded sections as <details> (GitHub renders Markdown inside them)."""
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
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(b[1])}</summary>\n\n{render_markdown(b[2])}\n</details>\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:.6em auto;padding:0 1em;color:#222;
line-height:1.35}h1{font-size:1.45em;margin:.3em 0}h2{font-size:1.15em;margin:.8em 0 .3em}p{margin:.3em 0}
ul{margin:.3em 0;padding-left:1.3em}li{margin:.15em 0}#answer+p,#answer+p+ul{font-size:.92em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .45em;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}figure{margin:.6em 0}
figcaption{color:#555;font-size:.85em}#fig-forest img{width:100%;max-width:1000px}
details{margin:.4em 0;border:1px solid #ddd;border-radius:4px;padding:.3em .6em}
summary{cursor:pointer;font-weight:600}"""


def _html_blocks(blocks: list[tuple], study_dir: Path) -> list[str]:
    e = html.escape
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h2":
            out.append(f'<h2 id="{_slug(b[1])}">{e(b[1])}</h2>')
        elif kind in ("h1", "p"):
            out.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((study_dir / b[1]).read_bytes()).decode("ascii")
            out.append(f'<figure id="fig-{_slug(Path(b[1]).stem)}"><img src="data:image/png;base64,{data}" '
                       f'alt="{e(b[2])}"><figcaption>{e(b[2])}</figcaption></figure>')
        elif kind == "details":
            out.append(f"<details><summary>{e(b[1])}</summary>")
            out += _html_blocks(b[2], study_dir)
            out.append("</details>")
    return out


def render_html(blocks: list[tuple], study_dir: Path) -> str:
    """One self-contained page: inline CSS, PNGs as base64 data URIs, every data string escaped, folded
    sections as <details> (no script needed to open them)."""
    title = next((b[1] for b in blocks if b[0] == "h1"), "quietgpt study")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>",
           *_html_blocks(blocks, study_dir), "</body></html>"]
    return "\n".join(out) + "\n"
