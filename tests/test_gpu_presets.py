"""The GPU presets' pipelines on the CPU: shakespeare-char, tinystories and gpt2-small (training presets and
their study presets), each built from its preset, shrunk to a toy size and run on a tiny local stand-in text
with the preset's own tokenizer, through train + eval and through a study, end to end.

What is shrunk (the data the presets name needs the network, and their sizes need a GPU): the model (2
layers, 32 wide, context 32), the run (4 iterations, trajectory points at 0, 2, 4 with the quantized ratios
at 0 and 4), the device (cpu) and compilation (off: compiling costs ~30 s on a CPU). Everything else (the
tokenizer, the optimizer and schedule settings, dropout, bias) is the preset's. GPT-2 BPE is tiktoken's real
encoding where its files are cached here, else a stand-in BPE named gpt2 trained on the stand-in text (tests
never download); without tiktoken those presets are skipped.
"""

from __future__ import annotations

import json
import random

import pytest

from quietgpt.cli import main
from quietgpt.config import load_config
from quietgpt.measurement.registry import catalogue, study_metrics, trajectory_metrics
from quietgpt.study.spec import resolve_spec

PRESETS = ["shakespeare-char", "tinystories", "gpt2-small"]
QUANT = ["w8a8", "w4a8"]  # the trajectories' default sweep (train.outlier_quant)


def stand_in_text(n: int = 300, seed: int = 0) -> str:
    """n short stories in TinyStories' manner, from a seeded generator (~45k characters)."""
    rng = random.Random(seed)
    names, things = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max"], ["ball", "kite", "cat", "tree", "cake", "boat"]
    feelings = ["happy", "sad", "scared", "proud", "tired"]
    stories = []
    for _ in range(n):
        a, b, t, f = rng.choice(names), rng.choice(names), rng.choice(things), rng.choice(feelings)
        stories.append(f"Once upon a time, {a} had a {t}. One day {b} came to play. \"Can I see your {t}?\" "
                       f"asked {b}. {a} felt {f}, but {a} shared the {t}. They played all day. The end.")
    return "\n".join(stories)


def shrink(cache) -> list[str]:
    """--set overrides that make a preset's run a toy (see the module docstring)."""
    sets = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
            "train.batch_size": 4, "train.gradient_accumulation_steps": 2, "train.compile": "false",
            "train.max_iters": 4, "train.lr_decay_iters": 4, "train.warmup_iters": 1, "train.eval_interval": 2,
            "train.eval_iters": 1, "train.log_interval": 1, "train.outlier_interval": 2,
            "train.outlier_quant_every": 2, "train.threads": 1, "data.cache_dir": str(cache),
            # gpt2-small holds out 0.05% of OpenWebText; of a 45k-character text that is no full window
            "data.val_fraction": 0.1}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture
def stand_in(tmp_path, monkeypatch, small_bpe, request):
    """(text file, vocabulary size the model must get) for the preset under test; GPT-2 BPE as described in
    the module docstring."""
    text = stand_in_text()
    path = tmp_path / "stories.txt"
    path.write_text(text, encoding="utf-8")
    if load_config(request.getfixturevalue("preset")).data.tokenizer != "gpt2":
        return path, len(set(text))  # char: one token per distinct character
    tiktoken = pytest.importorskip("tiktoken")
    load = pytest.importorskip("tiktoken.load")

    def no_network(blobpath):
        raise ConnectionError("tests never download")

    monkeypatch.setattr(load, "read_file", no_network)  # tiktoken's cache or nothing
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception:
        pytest.importorskip("regex")
        enc = small_bpe(text)
        monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
    return path, -(-enc.n_vocab // 64) * 64  # GPT-2 BPE is padded to a multiple of 64 (50257 -> 50304)


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_trajectory(run) -> None:
    """Points at 0, 2 and 4, each with every trajectory metric the variant has, the ratios at 0 and 4."""
    points = {r["iter"]: r["outliers"] for r in rows(run) if "outliers" in r}
    assert sorted(points) == [0, 2, 4]
    keys = set(trajectory_metrics(QUANT))
    ratios = {f"ppl_ratio_{q}" for q in QUANT}
    for it, values in points.items():
        assert set(values) == (keys if it in (0, 4) else keys - ratios), it
        assert all(v == v for v in values.values())  # finite numbers, no NaN


@pytest.mark.parametrize("preset", PRESETS)
def test_training_preset_trains_and_measures_on_a_stand_in(preset, stand_in, tmp_path, capsys):
    data, vocab = stand_in
    out, ev = tmp_path / "run", tmp_path / "eval.json"
    assert main(["train", "--preset", preset, "--data", str(data), "--device", "cpu", "--out", str(out),
                 *shrink(tmp_path / "cache")]) == 0
    cfg, want = json.loads((out / "config.json").read_text()), load_config(preset)
    assert cfg["model"]["vocab_size"] == vocab
    assert cfg["data"]["tokenizer"] == want.data.tokenizer
    for key in ("learning_rate", "min_lr", "beta1", "beta2", "weight_decay", "grad_clip"):
        assert cfg["train"][key] == getattr(want.train, key), key  # the preset's optimizer, not the shrink's
    assert cfg["model"]["dropout"] == want.model.dropout
    check_trajectory(out)
    assert main(["eval", "--checkpoint", str(out), "--quant", ",".join(QUANT), "--json", str(ev),
                 "--n-sequences", "4", "--calib-batches", "2", "--batch-size", "4"]) == 0
    summary = json.loads(ev.read_text())["summary"]
    expected = {k for k, m in catalogue(QUANT).items() if m.source == "eval"}
    assert expected <= set(summary)
    # every registry metric has a value, the papers' included, but the gate mean (softmax has no gate)
    assert [k for k in expected if summary[k] is None] == ["gate_mean"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_study_preset_runs_on_a_stand_in(preset, stand_in, tmp_path, capsys):
    data, vocab = stand_in
    out = tmp_path / "study"
    assert main(["study", "--preset", preset, "--out", str(out), "--data", str(data), "--device", "cpu",
                 "--jobs", "1", "--seeds", "1", "--variants", "softmax,softmax1", *shrink(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    spec = resolve_spec(preset)
    assert results["config"]["quant"] == list(spec.quant)  # the study preset's sweep
    expected = set(study_metrics(spec.quant)) | {f"auc_{k}" for k in trajectory_metrics(QUANT)}
    assert {(r["variant"], r["status"]) for r in results["runs"]} == {("softmax", "ok"), ("softmax1", "ok")}
    for r in results["runs"]:
        assert expected <= set(r)
        assert [k for k in expected if r[k] is None] == ["gate_mean"]
        run = out / r["dir"]
        assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == vocab
        check_trajectory(run)
    assert {e["variant"] for e in results["trajectories"]["emergence"]} == {"softmax", "softmax1"}
    assert (out / "report.md").is_file() and (out / "plots" / "trajectories.png").is_file()
