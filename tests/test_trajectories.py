"""Outliers through training (training/outliers.py, study/results.py): the logged points are the registry's
values on the fixed windows, measuring leaves training bit for bit unchanged, a resumed run logs the same
trajectory, and the area and emergence statistics match hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quietgpt.config import load_config
from quietgpt.data.sources import prepare
from quietgpt.errors import ConfigError
from quietgpt.measurement.evaluate import measure
from quietgpt.measurement.perplexity import calibration_batches
from quietgpt.measurement.registry import auc_metrics, mean_level, trajectory_metrics
from quietgpt.quant.simulated import quantized
from quietgpt.quant.spec import parse_quant
from quietgpt.runs.checkpoint import load_model
from quietgpt.study.results import emergence, first_above, read_trajectory, seed_mean
from quietgpt.training.loop import train
from quietgpt.training.outliers import OutlierTracker, trajectory_windows
from quietgpt.training.reporting import MetricsLog

VOLATILE = ("tokens_per_s", "outlier_s")


def tiny(tmp_path: Path, out: str, **over):
    """A tiny run on the embedded synthetic task with trajectories every 2 steps."""
    base = {"data.synthetic_tokens": 20000, "data.cache_dir": str(tmp_path / "cache"),
            "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
            "model.dropout": 0.0, "train.batch_size": 4, "train.max_iters": 6, "train.eval_interval": 3,
            "train.eval_iters": 2, "train.log_interval": 1, "train.warmup_iters": 2, "train.lr_decay_iters": 10,
            "train.learning_rate": 3e-3, "train.seed": 7, "train.threads": 1, "train.always_save_checkpoint": True,
            "train.outlier_interval": 2, "train.outlier_quant_every": 3, "train.outlier_sequences": 4,
            "train.out_dir": str(tmp_path / out)}
    return load_config("default", {**base, **over})


def log_rows(run: Path, volatile=VOLATILE) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in volatile}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def points(run: Path) -> dict[int, dict]:
    return {r["iter"]: r["outliers"] for r in log_rows(run) if "outliers" in r}


def same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_points_follow_the_interval_and_the_last_point_is_the_registry_value(tmp_path):
    cfg = tiny(tmp_path, "run")
    train(cfg, progress=False)
    run = Path(cfg.train.out_dir)
    pts = points(run)
    # every 2 steps and after the last; the quantized ratios every 3rd time (0, 6) only
    assert sorted(pts) == [0, 2, 4, 6]
    quant_keys = {"ppl_ratio_w8a8", "ppl_ratio_w4a8"}
    assert [bool(quant_keys & set(pts[i])) for i in (0, 2, 4, 6)] == [True, False, False, True]
    assert set(pts[6]) == set(trajectory_metrics(["w8a8", "w4a8"]))
    # the final point against measure() on the same windows (measure(seed=0) draws the observed windows the
    # trajectory reads): one definition of every statistic
    model, _ = load_model(run)
    ds = prepare(cfg.data)
    ev = measure(model, ds, quant=(), n_sequences=cfg.train.outlier_sequences, seed=0).to_dict()
    for key in pts[6]:
        if key not in quant_keys:
            assert pts[6][key] == pytest.approx(ev["summary"][key], rel=1e-9, abs=1e-12), key
    # the quantized ratios by hand: CE on the same windows, float and under quantized() calibrated on the same
    # seeded training batches
    T = cfg.model.block_size
    windows = trajectory_windows(len(ds.val), T, cfg.train.outlier_sequences)
    x = torch.from_numpy(np.stack([ds.val[s:s + n] for s, n in windows]).astype(np.int64))
    y = torch.from_numpy(np.stack([ds.val[s + 1:s + 1 + n] for s, n in windows]).astype(np.int64))
    model.eval()

    def nll(m=model) -> float:
        with torch.no_grad():
            logits, _ = m(x)
        return float(F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), reduction="mean"))

    fp = nll()
    calib = calibration_batches(ds.train, cfg.train.outlier_calib_batches, 8, T, 0, "cpu")  # measure()'s size
    for q in ("w8a8", "w4a8"):
        with quantized(model, parse_quant(q), calib) as st:
            ratio = math.exp(nll(st.model) - fp)
        assert pts[6][f"ppl_ratio_{q}"] == pytest.approx(ratio, rel=1e-5), q


def test_trajectories_leave_training_bit_identical(tmp_path):
    over = {"model.dropout": 0.1, "model.attention": "softmax1", "train.outlier_quant_every": 1}
    on, off = tiny(tmp_path, "on", **over), tiny(tmp_path, "off", **over, **{"train.outlier_interval": 0})
    train(on, progress=False)
    train(off, progress=False)
    a, b = Path(on.train.out_dir), Path(off.train.out_dir)
    assert sorted(points(a)) == [0, 2, 4, 6] and points(b) == {}
    assert [r for r in log_rows(a) if "outliers" not in r] == log_rows(b)  # losses, grad norms, evals
    same_weights(a, b)
    same_weights(a / "best", b / "best")


def test_a_killed_and_resumed_run_logs_the_same_trajectory(tmp_path, monkeypatch):
    over = {"train.max_iters": 20, "train.outlier_interval": 5, "train.eval_interval": 5,
            "train.outlier_quant_every": 2, "train.lr_decay_iters": 20}
    straight = tiny(tmp_path, "straight", **over)
    train(straight, progress=False)
    # stopped: trained to 10 (the final point there is an ordinary point), then resumed to 20
    train(tiny(tmp_path, "split", **{**over, "train.max_iters": 10}), progress=False)
    train(tiny(tmp_path, "split", **over), resume=True, progress=False)
    # killed: right after the point at 15 was logged, before its checkpoint; resumed from the one at 10
    real = OutlierTracker.__call__

    def dying(self, it):
        values = real(self, it)
        if it == 15:
            raise KeyboardInterrupt
        return values

    monkeypatch.setattr(OutlierTracker, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path, "killed", **over), progress=False)
    monkeypatch.undo()
    killed = tmp_path / "killed"
    assert 15 in points(killed)
    train(tiny(tmp_path, "killed", **over), resume=True, progress=False)
    a = Path(straight.train.out_dir)
    assert sorted(points(a)) == [0, 5, 10, 15, 20]
    for other in (tmp_path / "split", killed):
        assert log_rows(other) == log_rows(a)
        same_weights(other, a)


def test_metrics_log_keeps_the_rows_written_before_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"iter": 3, "loss": 1.0}, {"iter": 4, "outliers": {"a": 1.0}}, {"iter": 4, "val_loss": 2.0},
            {"iter": 4, "loss": 1.5}, {"iter": 6, "outliers": {"a": 2.0}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    MetricsLog(path, resume_from=4, enabled=True).close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]


def test_mean_level_is_the_trapezoid_over_the_span():
    # hand: (10 - 0) * (1 + 3) / 2 + (30 - 10) * (3 + 2) / 2 = 20 + 50 = 70 over a span of 30
    pts = [(30, 2.0), (0, 1.0), (10, 3.0), (20, None)]
    assert mean_level(pts) == pytest.approx(70 / 30)
    assert mean_level([(5, 4.0)]) == 4.0 and mean_level([]) is None and mean_level(None) is None
    # a constant trajectory's mean level is the constant; the registry's auc metric reads summary["trajectory"]
    m = auc_metrics(["w4a8"])["auc_ppl_ratio_w4a8"]
    assert m.value({}, {"trajectory": {"ppl_ratio_w4a8": [(0, 1.2), (50, 1.2), (250, 1.2)]}}) == pytest.approx(1.2)
    assert m.value({}, {}) is None and m.higher_is_worse and m.compared
    assert set(auc_metrics(["w8a8"])) == {f"auc_{k}" for k in trajectory_metrics(["w8a8"])}


def test_emergence_on_planted_trajectories(tmp_path):
    key = "first_token_mass_mean"
    trajs = {("softmax", 0): {key: [(0, 0.1), (10, 0.2), (20, 0.5)]},
             ("softmax", 1): {key: [(0, 0.1), (10, 0.5), (20, 0.6)]},  # seed mean at 10: 0.35 > 0.3
             ("sink", 0): {key: [(0, 0.1), (10, 0.3), (20, 0.2)]},  # 0.3 is not above 0.3
             ("sink", 1): {}}
    assert seed_mean([dict(t[key]) for (v, _), t in trajs.items() if v == "softmax"]) == pytest.approx(
        {0: 0.1, 10: 0.35, 20: 0.55})
    assert first_above({0: 0.0, 5: 0.31, 9: 0.9}, 0.3) == 5 and first_above({0: 0.3}, 0.3) is None
    out = {e["variant"]: e for e in emergence(trajs, ["softmax", "softmax1", "sink"], key, 0.3, "first mass")}
    assert set(out) == {"softmax", "sink"}  # softmax1 has no trajectory
    assert out["softmax"]["first_iter"] == 10 and out["softmax"]["n_seeds"] == 2
    assert "first exceeds 0.3 at iteration 10" in out["softmax"]["text"]
    assert out["sink"]["first_iter"] is None and out["sink"]["n_seeds"] == 1
    assert "never exceeds 0.3 within 20 iterations" in out["sink"]["text"]
    missing = emergence(trajs, ["softmax"], "sink_rate", 0.3, "sink rate")
    assert len(missing) == 1 and missing[0]["variant"] is None and "not in these runs" in missing[0]["text"]
    # read back from a metrics.jsonl: outlier rows only, cut lines and non-numbers skipped
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iter": 0, "loss": 3}\n{"iter": 5, "outliers": {"a": 2.0, "b": null}}\n'
                                       '{"iter": 0, "outliers": {"a": 1.0}}\n{"iter": 9, "outl')
    assert read_trajectory(run) == {"a": [(0, 1.0), (5, 2.0)]}
    assert read_trajectory(tmp_path / "none") == {}


@pytest.mark.parametrize("key, value", [("train.outlier_interval", -1), ("train.outlier_quant_every", -2),
                                        ("train.outlier_sequences", 0), ("train.outlier_calib_batches", 0),
                                        ("train.outlier_quant", "w8a8,int4")])
def test_bad_trajectory_settings_are_one_line_errors(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("default", {key: value})


def test_presets_carry_trajectories_that_end_on_a_quantized_point():
    from quietgpt.presets import preset_names, study_preset_names
    from quietgpt.study.spec import resolve_spec

    # confirm-cpu measures what its pre-registered hypotheses need and nothing else: trajectories off
    studies = [p for p in study_preset_names() if p != "confirm-cpu"]
    assert resolve_spec("confirm-cpu").run.train.outlier_interval == 0
    runs = [load_config(p).train for p in preset_names()] + [resolve_spec(p).run.train for p in studies]
    for t in runs:
        assert t.outlier_interval > 0
        assert t.max_iters % (t.outlier_interval * t.outlier_quant_every) == 0  # the last point has the ratios


def test_emergence_of_a_study_that_crosses_optimizers_is_per_arm():
    """Review defect: a study crossing optimizers keys its trajectories by arm ("softmax+muon"); the emergence
    statements must be made per arm, not looked up under the bare variant names (which found nothing)."""
    from quietgpt.study.results import trajectory_summary
    from quietgpt.study.spec import resolve_spec

    spec = resolve_spec("default", variants=["softmax", "softmax1"], seeds=1, optimizers=["adamw", "muon"])
    key = "sink_rate"  # one of the emergence statements (study/results.py EMERGENCE)
    trajs = {(arm, 0): {key: [(0, 0.1), (10, 0.5)]} for arm in spec.arms}
    found = {e["variant"] for e in trajectory_summary(spec, trajs)["emergence"] if e["metric"] == key}
    assert found == set(spec.arms) == {"softmax+adamw", "softmax+muon", "softmax1+adamw", "softmax1+muon"}


@pytest.mark.parametrize("n_tokens, block_size, n", [(1000, 32, 4), (1000, 32, 100), (40, 32, 4), (20, 32, 3)])
def test_trajectory_windows_are_the_ones_measure_observes(n_tokens, block_size, n):
    """Review defect: the fixed windows were a copy of measure()'s draw. Now one function draws them; measure()
    records the windows it observed, and the trajectory reads exactly those (also when the split has fewer full
    windows than asked, or none)."""
    import types

    import numpy as np

    from quietgpt import GPT, GPTConfig
    from quietgpt.measurement.evaluate import measure

    rng = np.random.default_rng(0)
    data = types.SimpleNamespace(train=rng.integers(0, 20, 500).astype(np.uint16),
                                 val=rng.integers(0, 20, n_tokens).astype(np.uint16), vocab_size=20)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    got = measure(model, data, quant=[], n_sequences=n, seed=0).observed
    assert got == [start for start, _ in trajectory_windows(n_tokens, block_size, n)]
    assert len(got) == min(n, max(1, (n_tokens - 1) // block_size))
