"""The benchmarks' bookkeeping, run on the CPU at toy size: the GPU training benchmark (tokens/s from the
timed iterations, MFU from the model's own FLOPs count, ratios to softmax), the trajectory cost, and the
prepared GPU run benchmarks/gpu_study.sh in its CPU mode (the files and JSON it promises, its time bounds)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quietgpt import GPT, GPTConfig
from quietgpt.measurement.registry import study_metrics, trajectory_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_train_gpu_benchmark_on_cpu(tmp_path):
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_gpu.py"), "--device", "cpu", "--preset", "default",
           "--vocab-size", "64", "--block-size", "32", "--batch-size", "2", "--iters", "2", "--warmup", "1",
           "--rounds", "2", "--compile", "off", "--variants", "softmax,softmax1", "--peak-tflops", "1.0",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["results"]}
    assert set(rows) == {"softmax", "softmax1"}
    assert rows["softmax"]["ratio_to_softmax"] == 1.0
    assert rows["softmax1"]["attention_paths"] == ["lse-flash-cpu"]
    model = GPT(GPTConfig.from_dict({**doc["model"], "attention": "softmax"}))
    for r in rows.values():
        assert len(r["all_ms"]) == 2
        assert abs(r["tokens_per_s"] - 2 * 32 / (r["ms_per_iter"] / 1e3)) < 1e-6 * r["tokens_per_s"]
        # MFU = tokens/s x FLOPs per token / peak (1 TFLOP/s here)
        flops = model.flops_per_token()  # softmax1 adds no parameters: the same yardstick
        assert abs(r["mfu"] - r["tokens_per_s"] * flops / 1e12) < 1e-9
    ratio = rows["softmax1"]["tokens_per_s"] / rows["softmax"]["tokens_per_s"]
    assert abs(rows["softmax1"]["ratio_to_softmax"] - ratio) < 1e-9


def test_trajectory_cost_benchmark_bookkeeping(tmp_path):
    out = tmp_path / "t.json"
    sets = ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.block_size=16", "train.batch_size=2",
            "train.eval_interval=4", "train.eval_iters=1", "data.synthetic_tokens=20000",
            f"data.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trajectory_cost.py"), "--max-iters", "4", "--interval", "2",
           "--rounds", "1", "--threads", "1", "--json", str(out), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    (on,), (off,) = doc["runs"]["on"], doc["runs"]["off"]
    assert (on["points"], off["points"]) == (3, 0)  # iterations 0, 2, 4
    assert on["quant_points"] == 2  # 0 and 4: the default study's outlier_quant_every = 2
    assert doc["ratio"] == on["outlier_s"] / on["train_s"] and 0 < doc["ratio"]
    assert doc["ratio_wall"] == (on["wall_s"] - off["wall_s"]) / off["train_s"]


GPU_STUDY = ROOT / "benchmarks" / "gpu_study.sh"
ATTENTION_VARIANTS = ["softmax", "softmax1", "softmax_n", "sink", "kvbias", "softpick", "sigmoid", "outgate"]
needs_tools = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")), reason="needs bash, timeout")


def gpu_study(tmp_path, *args, env=None) -> tuple[subprocess.CompletedProcess, Path]:
    """benchmarks/gpu_study.sh OUT --cpu --data TEXT ARGS (a small character text written here)."""
    text = tmp_path / "text.txt"
    text.write_text("".join(f"CITIZEN {i % 7}:\nWe are accounted poor citizens, the patricians good.\n\n"
                            for i in range(400)), encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(GPU_STUDY), str(out), "--cpu", "--data", str(text), *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    return proc, out


@needs_tools
@pytest.mark.slow
def test_gpu_study_script_cpu_mode_writes_what_it_promises(tmp_path):
    proc, out = gpu_study(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    parts = {p["part"]: p for p in summary["parts"]}
    assert list(parts) == ["study", "attention", "train_gpu", "gpu_tests"]  # the study first
    for p in parts.values():
        assert (p["status"], p["rc"]) == ("ok", 0) and 0 < p["wall_s"] <= p["bound_s"], p
        assert (out / p["log"]).read_text().startswith("$ ")  # each log opens with its command
    device = (out / "device.txt").read_text()
    assert "mode: cpu" in device and "quietgpt" in device and summary["device"] == device.strip()
    # (a) the study: 3 variants x 3 seeds, every registry metric, trajectories, no checkpoints left
    results = json.loads((out / "study" / "results.json").read_text())
    runs = results["runs"]
    assert sorted((r["variant"], r["seed"], r["status"]) for r in runs) == sorted(
        (v, s, "ok") for v in ("softmax", "softmax1", "sink") for s in range(3))
    metrics = set(study_metrics(results["config"]["quant"]))
    for r in runs:
        assert [k for k in metrics if r.get(k) is None] == ["gate_mean"]  # none of the three has a gate
        points = {}
        for line in (out / "study" / r["dir"] / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "outliers" in row:
                points[row["iter"]] = row["outliers"]
        assert sorted(points) == [0, 5, 10]  # study.toml --cpu: every 5 iterations, quantized every 10
        assert set(points[10]) == set(trajectory_metrics())
    assert not [p.name for p in (out / "study").rglob("*") if p.suffix == ".safetensors" or p.name == "train_state.pt"]
    assert (out / "study" / "report.md").is_file() and (out / "study.toml").is_file()
    assert summary["study"]["ok"] == 9 and set(summary["study"]["means"]["ppl_ratio_w4a8"]) == {
        "softmax", "softmax1", "sink"}
    # (b) the attention benchmark: every variant's fast path at both lengths, and SDPA's baseline row
    attn = json.loads((out / "attention.json").read_text())
    auto = {(r["T"], r["variant"]) for r in attn["results"] if r["requested"] == "auto"}
    assert auto == {(T, v) for T in (64, 128) for v in ATTENTION_VARIANTS}
    assert len(summary["attention"]["rows"]) == 2 * (len(ATTENTION_VARIANTS) + 1)
    # (b) gpt2-small's stand-in training benchmark: softmax vs softmax1 with MFU
    train = json.loads((out / "train_gpu.json").read_text())
    assert [(r["variant"], r["mfu"] > 0) for r in train["results"]] == [("softmax", True), ("softmax1", True)]
    assert summary["train_gpu"][1]["ratio_to_softmax"] == train["results"][1]["ratio_to_softmax"]
    if not torch.cuda.is_available():
        assert " skipped" in (out / "gpu_tests.log").read_text()  # the gpu tests skip themselves on the CPU
    assert "4 of 4 parts ok" in (out / "summary.txt").read_text()


@needs_tools
@pytest.mark.slow
def test_gpu_study_script_goes_on_after_a_part_times_out(tmp_path):
    proc, out = gpu_study(tmp_path, "--parts", "study,attention", env={"QUIETGPT_GPU_STUDY_TIMEOUT_STUDY": "2"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    parts = {p["part"]: p for p in json.loads((out / "summary.json").read_text())["parts"]}
    assert (parts["study"]["status"], parts["study"]["rc"], parts["study"]["bound_s"]) == ("timeout", 124, 2)
    assert parts["attention"]["status"] == "ok" and (out / "attention.json").is_file()
    assert "study: timeout (exit 124)" in proc.stdout


@needs_tools
@pytest.mark.parametrize("args, needle", [
    (["--parts", "study,foo"], "unknown part foo in --parts"),
    (["--data", "/no/such/file.txt"], "data file /no/such/file.txt does not exist"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["--parts"], "--parts needs a list"),
])
def test_gpu_study_script_bad_arguments_are_one_line_errors(tmp_path, args, needle):
    proc = subprocess.run(["bash", str(GPU_STUDY), str(tmp_path / "out"), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


@needs_tools
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_study_script_without_a_gpu_says_how_to_test_it(tmp_path):
    proc = subprocess.run(["bash", str(GPU_STUDY), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU visible to torch; to test this script on the CPU, add --cpu" in (
        proc.stderr), proc.stderr
    assert not (tmp_path / "out" / "parts.tsv").exists()  # it stopped before running anything


@pytest.mark.slow
def test_train_process_benchmark_times_whole_processes(tmp_path):
    """Each case is a real `quietgpt train` process: its wall time brackets the run's own training time,
    the speed ratio is the softmax wall time over the case's, and the goal entry follows the ratio."""
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(97 + (i * 7) % 26) for i in range(20000)))
    out = tmp_path / "p.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_process.py"), "--json", str(out), "--shakespeare",
           str(text), "--iters", "3", "--rounds", "1", "--variants", "softmax,softmax1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {r["case"]: r for r in doc["results"]}
    assert set(rows) == {"softmax", "softmax1"} and doc["iters"] == 3
    for r in rows.values():
        assert r["summary_tokens_per_s"] > r["process_tokens_per_s"] > 0  # start-up counts in the process's
        assert r["process_tokens_per_s"] == pytest.approx(3 * 12 * 64 / r["wall_s"])
    assert rows["softmax1"]["speed_vs_base"] == pytest.approx(rows["softmax"]["wall_s"] / rows["softmax1"]["wall_s"])
    assert rows["softmax1"]["speed_vs_base_by_round"] == pytest.approx([rows["softmax1"]["speed_vs_base"]])
    assert doc["goals"] == {"softmax1_ge_0.97x_softmax": rows["softmax1"]["speed_vs_base"] >= 0.97}


def test_train_step_benchmark_pairs_steps(tmp_path):
    """Every round times one real train_step per variant: the medians and paired differences are those of
    the raw times after the warm-up, the batch is the preset's and each variant ran its own path."""
    out = tmp_path / "s.json"
    warmup, steps = 2, 5
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--json", str(out), "--steps", str(steps),
           "--warmup", str(warmup), "--variants", "softmax,softmax1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["batch"] == [12, 64] and doc["vocab_size"] == 65 and doc["warmup"] == 2  # shakespeare-char-cpu
    rows = {r["variant"]: r for r in doc["results"]}
    assert rows["softmax"]["paths"] == ["sdpa"] and rows["softmax1"]["paths"] == ["lse-flash-cpu"]
    base = rows["softmax"]["all_step_ms"][warmup:]
    mine = rows["softmax1"]["all_step_ms"][warmup:]
    assert len(mine) == 3 and len(rows["softmax1"]["all_step_ms"]) == steps
    assert rows["softmax1"]["step_ms"] == pytest.approx(sorted(mine)[1])
    assert rows["softmax1"]["step_paired_diff_ms"] == pytest.approx(sorted(a - b for a, b in zip(mine, base))[1])
    assert rows["softmax1"]["step_speed_vs_softmax"] == pytest.approx(sorted(base)[1] / sorted(mine)[1])
    assert rows["softmax"]["step_paired_diff_ms"] == 0.0


def test_benchmark_goal_column():
    from benchmarks.__main__ import _goal

    assert _goal(1.04, 1.05, "<=") == "<= 1.05: met"
    assert _goal(1.06, 1.05, "<=") == "<= 1.05: missed"
    assert _goal(0.96, 0.97, ">=") == ">= 0.97: missed"
    assert _goal(1.3, None, "<=") == ""


def test_sinks_ladder_summary_reads_tokens_and_largest_values(tmp_path):
    """benchmarks/sinks_ladder.py's map: tokens seen = iteration x batch x accumulation x context (from each run's
    config.json), the largest and final trajectory values per metric (a planted run), and the plot written."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import sinks_ladder as L

    run = tmp_path / "wd1.0-s0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "model": {"block_size": 64}, "data": {"source": "x.txt"},
        "train": {"batch_size": 12, "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "weight_decay": 1.0,
                  "max_iters": 200}}))
    rows = [{"iter": 0, "loss": 4.0}] + [
        {"iter": i, "outliers": {"sink_rate": s, "first_token_mass_mean": m, "massive_ratio_max": 5.0 + i / 100}}
        for i, s, m in ((0, 0.0, 0.07), (100, 0.25, 0.30), (200, 0.125, 0.20))]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    out = L.summarise(tmp_path)["runs"]["wd1.0-s0"]
    assert out["tokens"] == 200 * 12 * 2 * 64
    assert out["largest"]["sink_rate"] == 0.25 and out["final"]["sink_rate"] == 0.125
    assert out["largest"]["first_token_mass_mean"] == 0.30 and out["largest"]["massive_ratio_max"] == 7.0
    assert out["config"]["weight_decay"] == 1.0
    assert (tmp_path / "ladder.png").stat().st_size > 0 and (tmp_path / "ladder.json").exists()
