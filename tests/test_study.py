"""`quietgpt study` end to end on a micro study: paired runs, results contract, resume, failures, launchers."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from quietgpt.cli import main
from quietgpt.errors import QuietError

CONTRACT = ["variant", "seed", "status", "error", "val_loss", "ppl", "ppl_w8a8", "weight_kurtosis_mean",
            "weight_kurtosis_max", "act_inf_norm_max", "act_kurtosis_mean", "unassigned_mass_mean",
            "tokens_per_s", "wall_s", "dir"]


def tiny(cache: Path) -> dict:
    """A model and run small enough that one (variant, seed) trains and measures in about a second."""
    return {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
            "train.batch_size": 4, "train.max_iters": 5, "train.lr_decay_iters": 5, "train.warmup_iters": 1,
            "train.eval_interval": 5, "train.eval_iters": 2, "train.log_interval": 1,
            "data.synthetic_tokens": 20000, "data.cache_dir": str(cache),
            # one thread: tiny matmuls on a busy 2-core machine are much faster without thread contention
            "train.threads": 1}



def tiny_args(cache: Path) -> list[str]:
    return [a for k, v in tiny(cache).items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """One micro study shared by the tests below: softmax1 and sink x 2 seeds, via the CLI."""
    root = tmp_path_factory.mktemp("study")
    out = root / "s"
    rc = main(["study", "--out", str(out), "--variants", "softmax,softmax1,sink", "--seeds", "2", "--jobs", "1",
               "--quant", "w8a8", *tiny_args(root / "cache")])
    assert rc == 0
    return out, root


def _row(results, v, s):
    return next(r for r in results["runs"] if r["variant"] == v and r["seed"] == s)


@pytest.mark.slow
def test_micro_study_end_to_end(micro):
    out, _ = micro
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 6
    for r in results["runs"]:
        assert r["status"] == "ok", r.get("error")
        assert set(CONTRACT) <= set(r)
        d = out / r["dir"]
        for f in ("model.safetensors", "metrics.jsonl", "summary.json", "eval.json", "attn_sample.npz",
                  "result.json"):
            assert (d / f).is_file(), f
        ev = json.loads((d / "eval.json").read_text())
        assert r["ppl"] == pytest.approx(ev["perplexity"]["fp"]) and r["ppl_w8a8"] == pytest.approx(
            ev["perplexity"]["w8a8"])
        assert r["val_loss"] == pytest.approx(json.loads((d / "summary.json").read_text())["val_loss"])
    # softmax assigns all attention mass; softmax1 and sink can leave some on nothing
    assert all(r["unassigned_mass_mean"] == pytest.approx(0.0, abs=1e-6)
               for r in results["runs"] if r["variant"] == "softmax")
    assert all(r["unassigned_mass_mean"] > 0 for r in results["runs"] if r["variant"] != "softmax")
    assert set(results["summary"]["val_loss"]) == {"softmax", "softmax1", "sink"}
    assert {(c["a"], c["b"]) for c in results["comparisons"]} == {("softmax1", "softmax"), ("sink", "softmax")}
    # every compared metric pairs both seeds, except the gate mean, which no variant here has (missing, n=0)
    assert all(c["n"] == (0 if c["metric"] == "gate_mean" else 2) for c in results["comparisons"])
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 7
    # trajectories: points at 0 and after the last step (5), their areas compared paired like the final metrics
    assert all(isinstance(r["auc_weight_kurtosis_max"], float) and r["auc_ppl_ratio_w4a8"] > 0
               for r in results["runs"])
    assert {c["metric"] for c in results["comparisons"]} >= {"auc_weight_kurtosis_max", "auc_ppl_ratio_w4a8"}
    assert {e["variant"] for e in results["trajectories"]["emergence"] if e["metric"] == "ppl_ratio_w4a8"} == {
        "softmax", "softmax1", "sink"}
    # the report: every plot inline in a parseable HTML page
    imgs = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                imgs.append(dict(attrs)["src"])

    P().feed((out / "report.html").read_text())
    plots = sorted((out / "plots").glob("*.png"))
    # incl. the forest plot, one unassigned-mass figure and the trajectories (the default study carries them)
    assert len(plots) == 8 and len(imgs) == 8 and (out / "plots" / "trajectories.png").is_file()
    assert all(src.startswith("data:image/png;base64,") for src in imgs)


@pytest.mark.slow
def test_paired_design_same_init_and_batches(micro):
    """sink starts as softmax1 (sink logit 0), so with the same initial weights and the same first batch
    their iteration-0 training loss must agree exactly, per seed, while different seeds differ."""
    out, _ = micro

    def first_loss(name):
        rows = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in rows if r.get("iter") == 0 and "loss" in r)

    for s in (0, 1):
        assert first_loss(f"softmax1-s{s}") == pytest.approx(first_loss(f"sink-s{s}"), rel=1e-6)
    assert first_loss("softmax1-s0") != pytest.approx(first_loss("softmax1-s1"), rel=1e-6)


@pytest.mark.slow
def test_resume_redoes_only_the_missing_run(micro):
    out, root = micro
    import shutil

    before = json.loads((out / "results.json").read_text())
    keep = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()
            and "sink-s1" not in p.parts}
    shutil.rmtree(out / "runs" / "sink-s1")
    rc = main(["study", "--out", str(out), "--variants", "softmax,softmax1,sink", "--seeds", "2", "--jobs", "1",
               "--quant", "w8a8", *tiny_args(root / "cache")])
    assert rc == 0
    assert (out / "runs" / "sink-s1" / "result.json").is_file()
    for p, mtime in keep.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was rewritten"
    after = json.loads((out / "results.json").read_text())
    # on CPU a run is a pure function of its config: the redone run reproduces its numbers
    assert _row(after, "sink", 1)["val_loss"] == pytest.approx(_row(before, "sink", 1)["val_loss"], rel=1e-5)
    assert _row(after, "softmax", 0) == _row(before, "softmax", 0)


@pytest.mark.slow
def test_changed_config_is_refused_then_forced(micro, capsys):
    out, root = micro
    args = ["study", "--out", str(out), "--variants", "softmax,softmax1,sink", "--seeds", "2", "--jobs", "1",
            *tiny_args(root / "cache")]
    capsys.readouterr()
    assert main([*args, "--quant", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another config" in err and "quant" in err and "--force" in err
    results = json.loads((out / "results.json").read_text())
    assert "ppl_w8a8" in results["runs"][0]  # nothing was touched
    # --force: the same trained models (training is not redone), re-measured without the quantization sweep
    weights = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model.safetensors")}
    assert len(weights) == 6
    assert main([*args, "--quant", "", "--force"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert all(r["status"] == "ok" and "ppl_w8a8" not in r and r["ppl"] for r in results["runs"])
    assert all(p.stat().st_mtime_ns == m for p, m in weights.items())


@pytest.mark.slow
def test_pool_of_two_and_a_failed_run_is_listed(tmp_path):
    """jobs=2 runs in a process pool; a run whose folder cannot be made (a file is in the way) fails, and is
    listed with its error rather than dropped; the other run is unaffected."""
    from quietgpt.study import run_study

    (tmp_path / "s" / "runs").mkdir(parents=True)
    (tmp_path / "s" / "runs" / "softmax1-s0").write_text("in the way")
    results = run_study(tmp_path / "s", variants=["softmax", "softmax1"], seeds=1, overrides=tiny(tmp_path / "c"),
                        quant=[], jobs=2, progress=False)
    ok, bad = _row(results, "softmax", 0), _row(results, "softmax1", 0)
    assert ok["status"] == "ok" and ok["error"] is None, ok["error"]
    assert bad["status"] == "failed" and "softmax1-s0" in bad["error"]
    md = (tmp_path / "s" / "report.md").read_text()
    assert "softmax1-s0" in md.split("## Failed runs")[1]
    assert all(c["n"] == 0 and "not enough seeds" in c["verdict"] for c in results["comparisons"]
               if c["family"] == "exploratory")


@pytest.mark.slow
def test_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit")
    from quietgpt.study import run_study

    results = run_study(tmp_path / "s", variants=["softmax"], seeds=1, overrides=tiny(tmp_path / "c"),
                        quant=[], launcher="submitit-local", progress=False)
    assert [r["status"] for r in results["runs"]] == ["ok"], [r.get("error") for r in results["runs"]]
    assert len(list((tmp_path / "s" / "slurm").rglob("*_submitted.pkl"))) == 1  # went through submitit
    assert (tmp_path / "s" / "report.html").is_file()


def test_bad_study_options_are_one_line_errors(tmp_path, capsys):
    from quietgpt.study import run_study

    for kwargs, words in (({"variants": ["softmax", "nope"]}, "nope"), ({"seeds": 0}, "--seeds"),
                          ({"jobs": 0}, "--jobs"), ({"overrides": {"train.seed": "3"}}, "train.seed"),
                          ({"quant": ["w99a8"]}, "w99a8")):
        with pytest.raises(QuietError, match=words):
            run_study(tmp_path / "x", **kwargs, progress=False)
    assert main(["study", "--out", str(tmp_path / "y"), "--preset", "nope"]) == 2
    assert "unknown study preset" in capsys.readouterr().err
    assert not (tmp_path / "x" / "runs").exists()


def test_slurm_launcher_errors_are_one_line(tmp_path, monkeypatch):
    import sys

    from quietgpt.study import run_study

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if the slurm extra were not installed
    with pytest.raises(QuietError, match=r"pip install 'quietgpt\[slurm\]'"):
        run_study(tmp_path / "a", seeds=1, launcher="slurm", progress=False)
    monkeypatch.delitem(sys.modules, "submitit")
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(QuietError, match="no sbatch"):
        run_study(tmp_path / "b", seeds=1, launcher="slurm", progress=False)


def test_one_study_at_a_time_per_folder(tmp_path):
    from quietgpt.runs.lock import RunLock
    from quietgpt.study import run_study

    with RunLock(tmp_path / "s"), pytest.raises(QuietError, match="in use by another quietgpt run"):
        run_study(tmp_path / "s", seeds=1, overrides=tiny(tmp_path / "c"), progress=False)
    assert not (tmp_path / "s" / "study.json").exists()


@pytest.mark.slow
def test_killed_study_leaves_no_orphan_workers(tmp_path):
    """SIGKILL a study running a 2-worker pool: the kernel takes its workers down too (PR_SET_PDEATHSIG),
    so no orphan keeps training into a run folder the restarted study will redo."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    args = {**tiny(tmp_path / "cache"), "train.max_iters": 100000, "train.lr_decay_iters": 100000,
            "train.eval_interval": 100000}
    cmd = [sys.executable, "-m", "quietgpt", "study", "--out", str(tmp_path / "s"), "--variants",
           "softmax,softmax1", "--seeds", "1", "--jobs", "2", "--quant", "w8a8"]
    cmd += [a for k, v in args.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    deadline = time.time() + 90
    workers: list[int] = []
    runs = tmp_path / "s" / "runs"
    while time.time() < deadline and (len(workers) < 2 or len(list(runs.glob("*/.lock"))) < 2):
        workers = [p for p in children() if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")]
        time.sleep(0.2)
    assert len(workers) >= 2 and len(list(runs.glob("*/.lock"))) == 2, "the pool never started training"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.1)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"orphaned pool workers survived the study: {alive}"


@pytest.mark.slow
def test_a_study_crossing_variants_with_optimizers(tmp_path):
    """--optimizers adamw,muon: one arm per variant+optimizer, paired by seed against softmax+adamw."""
    out = tmp_path / "x"
    rc = main(["study", "--out", str(out), "--variants", "softmax,softmax1", "--optimizers", "adamw,muon",
               "--seeds", "1", "--jobs", "1", "--quant", "", *tiny_args(tmp_path / "cache")])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["runs"]}
    assert set(rows) == {"softmax+adamw", "softmax1+adamw", "softmax+muon", "softmax1+muon"}
    assert all(r["status"] == "ok" for r in rows.values())
    assert (rows["softmax1+muon"]["attention"], rows["softmax1+muon"]["optimizer"]) == ("softmax1", "muon")
    cfg = json.loads((out / "runs" / "softmax1+muon-s0" / "config.json").read_text())
    assert (cfg["model"]["attention"], cfg["train"]["optimizer"]) == ("softmax1", "muon")
    assert {c["b"] for c in results["comparisons"]} == {"softmax+adamw"}
    assert {c["a"] for c in results["comparisons"]} == {"softmax1+adamw", "softmax+muon", "softmax1+muon"}
    # Muon moves the hidden matrices differently: the same seed's runs part ways
    assert rows["softmax+muon"]["val_loss"] != rows["softmax+adamw"]["val_loss"]


def test_a_run_under_init_is_recognised_though_its_config_json_holds_the_pretrained_architecture(tmp_path):
    """--init writes the pretrained model's architecture (and the variant's swap settings) into config.json;
    the study's own config, which does not know them, must still see the run as its own (and resume it)."""
    from quietgpt.config import load_config
    from quietgpt.interop.pretrained import resolve_config
    from quietgpt.study.run import _same_config

    cfg = load_config("default", {"train.init": "hf:/somewhere", "model.attention": "sink",
                                  "train.out_dir": str(tmp_path)})
    arch = {**cfg.model.to_dict(), "n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 64, "vocab_size": 99}
    resolved, changes = resolve_config(cfg, arch)
    assert any("sink_init" in c for c in changes)
    (tmp_path / "config.json").write_text(json.dumps(resolved.to_dict()))
    assert _same_config(tmp_path, cfg)
    other = load_config("default", {"train.init": "hf:/somewhere", "model.attention": "sink",
                                    "train.learning_rate": "3e-4", "train.out_dir": str(tmp_path)})
    assert not _same_config(tmp_path, other)  # a setting the pretrained model does not set still counts


@pytest.mark.slow
def test_a_study_measures_sensitivity_and_the_predictors_and_reports_them(tmp_path):
    """study.sensitivity: each run's eval.json has every group's ratio; results.json's "sensitivity" holds the
    groups in quant_groups' order with each arm's means equal to its runs' and the paired differences; the
    report shows the heat map and the predictor table. A re-measure of the same runs with another sweep (--force)
    reuses the checkpoints: no training step is taken."""
    from quietgpt.quant.simulated import group_order

    out = tmp_path / "s"
    rc = main(["study", "--out", str(out), "--variants", "softmax,softmax1", "--seeds", "3", "--jobs", "1",
               "--quant", "w4a8,w4a8-gptq", "--sensitivity", "w4a8", *tiny_args(tmp_path / "cache")])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    sens = res["sensitivity"]["w4a8"]
    assert sens["groups"] == sorted(sens["groups"], key=group_order) and sens["groups"][-1] == "all"
    assert sens["groups"][:3] == ["wte/head", "wpe", "h0.qkv"]
    evs = [json.loads((out / "runs" / f"softmax-s{s}" / "eval.json").read_text()) for s in range(3)]
    for g in sens["groups"]:
        assert sens["arms"]["softmax"][g]["mean"] == pytest.approx(np.mean([e["sensitivity"]["w4a8"][g] for e in evs]))
    assert sens["diff"]["softmax1"]["all"]["n"] == 3
    assert set(res["predictors"]["runs"]) == {"ppl_ratio_w4a8", "ppl_ratio_w4a8-gptq"}
    md = (out / "report.md").read_text()
    assert "## Where the penalty lives" in md and "plots/sensitivity_w4a8.png" in md
    assert "Which outlier metric predicts the damage" in md and (out / "plots" / "sensitivity_w4a8.png").is_file()
    steps = (out / "runs" / "softmax-s0" / "metrics.jsonl").read_text().count('"train_loss"')
    rc = main(["study", "--out", str(out), "--variants", "softmax,softmax1", "--seeds", "3", "--jobs", "1",
               "--quant", "w4a8-g8-e8", "--force", *tiny_args(tmp_path / "cache")])
    assert rc == 0
    assert (out / "runs" / "softmax-s0" / "metrics.jsonl").read_text().count('"train_loss"') == steps
    assert "ppl_ratio_w4a8-g8-e8" in json.loads((out / "results.json").read_text())["runs"][0]
