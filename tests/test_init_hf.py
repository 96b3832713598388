"""Training from a pretrained GPT-2 with the attention swapped (`train --init hf:FOLDER`, interop/pretrained.py), on
a tiny random GPT-2 saved with save_pretrained and char-tokenised text: the run takes the pretrained architecture,
its iteration-0 loss is transformers' own on the same batches (softmax) or within what the variant's math allows,
every seed starts from the same weights, resume continues the checkpoint, and the result exports and evaluates
like any run."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from quietgpt.cli import main
from quietgpt.config import load_config
from quietgpt.data.sources import get_batch, prepare
from quietgpt.errors import ConfigError, QuietError
from quietgpt.interop import pretrained
from quietgpt.nn.model import GPT
from quietgpt.runs import checkpoint
from quietgpt.training.loop import train
from quietgpt.training.schedule import EVAL_STREAM, derive_seed, generator

transformers = pytest.importorskip("transformers")

HF = dict(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)  # activation: gelu_new (GPT-2's)
RUN = {"train.batch_size": 4, "train.eval_iters": 4, "train.max_iters": 2, "train.lr_decay_iters": 2,
       "train.warmup_iters": 1, "train.eval_interval": 1, "train.log_interval": 1, "train.threads": 1}
VARIANTS = ("softmax", "softmax1", "softmax_n", "sink", "clipped", "gated")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random GPT-2 (biases and LayerNorms perturbed, so every tensor matters) saved with save_pretrained,
    and a text file of random words, char-tokenised into 27 ids (a-z and the space)."""
    root = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF, bos_token_id=0, eos_token_id=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.05))
    hf.save_pretrained(str(root / "gpt2"))
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    (root / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(5000)), encoding="utf-8")
    return root


def run_config(world, out, variant="softmax", **extra):
    return load_config("default", {"train.init": f"hf:{world / 'gpt2'}", "model.attention": variant,
                                   "data.source": str(world / "text.txt"), "data.tokenizer": "char",
                                   "data.cache_dir": str(world / "cache"), "train.out_dir": str(out),
                                   **({"model.softmax_n": 3.0} if variant == "softmax_n" else {}), **RUN, **extra})


def first_eval(run_dir) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r.get("iter") == 0 and "val_loss" in r)


def hf_loss(world, cfg, split: str) -> float:
    """transformers' own model's mean loss over the batches of the run's iteration-0 eval of `split` (the eval
    generators are seeded by (seed, split) alone: training.evaluate)."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(world / "gpt2")).eval()
    tokens = getattr(prepare(cfg.data), split)
    gen = generator(derive_seed(cfg.train.seed, EVAL_STREAM + ("train", "val").index(split)))
    total = 0.0
    with torch.no_grad():
        for _ in range(cfg.train.eval_iters):
            x, y = get_batch(tokens, cfg.train.batch_size, cfg.model.block_size, gen)
            total += F.cross_entropy(hf(x).logits.reshape(-1, HF["vocab_size"]), y.reshape(-1)).item()
    return total / cfg.train.eval_iters


@pytest.fixture(scope="module")
def runs(world):
    """variant -> its run folder: 2 steps from the pretrained model, evaluated at iterations 0, 1 and 2."""
    out = {}
    for v in VARIANTS:
        train(run_config(world, world / "runs" / v, v), progress=False)
        out[v] = world / "runs" / v
    return out


# ----------------------------------------------------------------------------- the config


def test_init_config_field_and_its_tokenizer():
    assert load_config("default").train.init == ""
    for bad in ("gpt2", "hf:", "hf:  ", "file:/x"):
        with pytest.raises(ConfigError) as e:
            load_config("default", {"train.init": bad})
        assert "train.init" in str(e.value) and "hf:NAME_OR_PATH" in str(e.value)
    # text goes through the pretrained model's tokenizer (GPT-2 BPE) unless the user names another
    assert load_config("default", {"train.init": "hf:gpt2", "data.source": "a.txt"}).data.tokenizer == "gpt2"
    assert load_config("default", {"train.init": "hf:gpt2", "data.source": "a.txt",
                                   "data.tokenizer": "char"}).data.tokenizer == "char"
    assert load_config("default", {"data.source": "a.txt"}).data.tokenizer == "auto"
    assert load_config("default", {"train.init": "hf:gpt2"}).data.tokenizer == "auto"  # synthetic: its own


# ----------------------------------------------------------------------------- the CLI run


def test_train_init_softmax1_from_the_cli(world, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--init", f"hf:{world / 'gpt2'}", "--attention", "softmax1", "--data", str(world / "text.txt"),
            "--out", str(out), *[a for k, v in {**RUN, "data.tokenizer": "char", "train.max_iters": 4,
                                                "train.lr_decay_iters": 4, "data.cache_dir": str(world / "cache"),
                                                }.items() for a in ("--set", f"{k}={v}")]]
    assert main(argv) == 0
    err = capsys.readouterr().err
    doc = json.loads((out / "config.json").read_text())
    # the architecture is the pretrained model's (the default preset's 4 x 128, no bias, exact GELU replaced)
    assert {k: doc["model"][k] for k in pretrained.FROM_PRETRAINED} == {
        "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 96, "bias": True, "gelu": "tanh"}
    assert doc["model"]["attention"] == "softmax1" and doc["train"]["init"] == f"hf:{world / 'gpt2'}"
    assert "model.n_layer 4 -> 2" in err and "model.gelu 'none' -> 'tanh'" in err
    assert "step 0 of the pretrained softmax model" in err and "char tokenizer (27 tokens)" in err
    init = doc["init"]
    assert init["from"] == f"hf:{world / 'gpt2'}" and set(init["pretrained_loss"]) == {"train", "val"}
    assert first_eval(out)["val_loss"] > 0
    s = json.loads((out / "summary.json").read_text())
    assert s["val_loss"] < first_eval(out)["val_loss"]  # it trains


# ----------------------------------------------------------------------------- how close the start is


def test_iteration_0_loss_against_transformers(world, runs):
    """softmax --init is the pretrained model: its iteration-0 losses are transformers' own on the same batches;
    sink (b = -10) and gated (gates at sigmoid(10)) sit within 1e-4; softmax1, softmax_n and clipped start
    where their math puts them (reported, and different: the swap happened)."""
    cfg = checkpoint.run_config_of(checkpoint.read_config(runs["softmax"]))  # as it ran: the pretrained sizes
    assert cfg.model.block_size == HF["n_positions"]
    ref = {s: hf_loss(world, cfg, s) for s in ("train", "val")}
    step0 = {v: first_eval(d) for v, d in runs.items()}
    for v, d in runs.items():
        recorded = json.loads((d / "config.json").read_text())["init"]["pretrained_loss"]
        assert recorded["val"] == pytest.approx(ref["val"], abs=1e-5) and recorded["train"] == pytest.approx(
            ref["train"], abs=1e-5), v  # the printed reference is transformers' loss
    assert step0["softmax"]["val_loss"] == pytest.approx(ref["val"], abs=1e-5)
    assert step0["softmax"]["train_loss"] == pytest.approx(ref["train"], abs=1e-5)
    for v in ("sink", "gated"):
        assert step0[v]["val_loss"] == pytest.approx(ref["val"], abs=1e-4), v
    report = {v: step0[v]["val_loss"] - ref["val"] for v in VARIANTS}
    print("iteration-0 val loss minus transformers':", {v: f"{d:+.2e}" for v, d in report.items()})
    for v in ("softmax1", "softmax_n", "clipped"):
        assert math.isfinite(report[v]) and abs(report[v]) > 1e-4, v


def test_swap_rules_set_the_new_parameters(world, runs):
    sink, _ = checkpoint.load_model(runs["sink"])  # after 2 steps: still near the rule's value
    assert all(abs(b - pretrained.SINK_LOGIT) < 0.05 for blk in sink.transformer.h
               for b in blk.attn.core.sink_logit.tolist())
    doc = json.loads((runs["sink"] / "config.json").read_text())
    assert doc["model"]["sink_init"] == pretrained.SINK_LOGIT and "sink logits" in doc["init"]["swap"]
    gated = json.loads((runs["gated"] / "config.json").read_text())
    assert gated["model"]["gate_init"] == pytest.approx(1 / (1 + math.exp(-pretrained.GATE_LOGIT)))


def test_every_seed_starts_from_the_same_pretrained_weights(world):
    """The paired design: the pretrained tensors, and each rule's parameters, do not depend on the seed."""
    hf = pretrained.load_pretrained(f"hf:{world / 'gpt2'}")
    theirs = hf.state_dict()
    for v in ("softmax", "sink", "gated", "softmax1"):
        models = []
        for seed in (0, 1):
            cfg, _ = pretrained.resolve_config(run_config(world, "x", v, **{"train.seed": seed}), hf.config.to_dict())
            torch.manual_seed(seed)
            model = GPT(cfg.model)
            pretrained.start_from(model, hf)
            models.append(model.state_dict())
        assert models[0].keys() == models[1].keys()
        assert all(torch.equal(models[0][k], models[1][k]) for k in models[0]), v
        assert all(torch.equal(models[0][k], theirs[k]) for k in theirs), v
        if v == "gated":
            gate = models[0]["transformer.h.0.attn.gate.weight"]
            assert torch.count_nonzero(gate) == 0 and torch.all(models[0]["transformer.h.1.attn.gate.bias"] == 10.0)
    # without a rule a variant's own parameters keep their (seeded) random init, and the note says so
    rules = dict(pretrained.SWAP_INITS)
    try:
        del pretrained.SWAP_INITS["gated"]
        cfg, _ = pretrained.resolve_config(run_config(world, "x", "gated"), hf.config.to_dict())
        model = GPT(cfg.model)
        note = pretrained.start_from(model, hf)
        assert "no pretrained-init rule for gated" in note and "weight" in note and "bias" in note
        assert torch.count_nonzero(model.transformer.h[0].attn.gate.weight) > 0
    finally:
        pretrained.SWAP_INITS.clear()
        pretrained.SWAP_INITS.update(rules)


# ----------------------------------------------------------------------------- resume, export, eval


def test_resume_continues_the_checkpoint_without_the_pretrained_model(world, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(world / "gpt2", folder)
    sets = {"train.init": f"hf:{folder}", "train.lr_decay_iters": 4}
    whole = tmp_path / "whole"
    train(run_config(world, whole, "sink", **sets, **{"train.max_iters": 4}), progress=False)
    part = tmp_path / "part"
    train(run_config(world, part, "sink", **sets), progress=False)
    shutil.rmtree(folder)  # a resume never reads the pretrained model again
    s = train(run_config(world, part, "sink", **sets, **{"train.max_iters": 4}), resume=True, progress=False)
    assert s["val_loss"] == json.loads((whole / "summary.json").read_text())["val_loss"]
    assert json.loads((part / "config.json").read_text())["init"] == json.loads(
        (whole / "config.json").read_text())["init"]
    with pytest.raises(QuietError) as e:  # another starting point cannot be resumed
        train(run_config(world, part, "sink", **{**sets, "train.init": f"hf:{world / 'gpt2'}",
                                                 "train.max_iters": 5}), resume=True, progress=False)
    assert "\n" not in str(e.value) and "started from" in str(e.value) and "train.init" in str(e.value)


def test_a_tokenizer_larger_than_the_vocabulary_is_a_one_line_error(world, tmp_path):
    with pytest.raises(QuietError) as e:
        train(run_config(world, tmp_path / "r", **{"data.tokenizer": "byte"}), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "256 tokens" in msg and "vocabulary of 96" in msg and "data.tokenizer" in msg
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.slow
def test_export_round_trips_every_variant(world, runs, tmp_path):
    from quietgpt.interop.hf_export import export_checkpoint

    idx = torch.randint(0, HF["vocab_size"], (3, HF["n_positions"]), generator=torch.Generator().manual_seed(3))
    for v, run in runs.items():
        s = export_checkpoint(run, tmp_path / v)
        assert s["kind"] == ("gpt2" if v == "softmax" else "quietgpt") and s["max_logit_diff"] <= 1e-5
        ours, _ = checkpoint.load_model(run)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / v), trust_remote_code=True).eval()
        with torch.no_grad():
            assert torch.allclose(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0), v


@pytest.mark.slow
def test_eval_hf_and_checkpoint_agree_on_the_same_weights(world, runs, tmp_path, capsys):
    from quietgpt.interop.hf_export import export_checkpoint

    export_checkpoint(runs["softmax"], tmp_path / "hf")
    common = ["--quant", "w8a8,int8-dynamic", "--n-sequences", "4", "--calib-batches", "2"]
    assert main(["eval", "--checkpoint", str(runs["softmax"]), "--json", str(tmp_path / "c.json"), *common]) == 0
    assert main(["eval", "--hf", str(tmp_path / "hf"), "--data", str(world / "text.txt"), "--tokenizer", "char",
                 "--cache-dir", str(world / "cache"), "--json", str(tmp_path / "h.json"), *common]) == 0
    c, h = (json.loads((tmp_path / f"{x}.json").read_text()) for x in ("c", "h"))
    assert c["perplexity"]["tokens"] == h["perplexity"]["tokens"]
    for k in ("fp", "w8a8", "int8-dynamic"):
        assert h["perplexity"][k] == pytest.approx(c["perplexity"][k], rel=1e-6), k
    for k in ("weight_kurtosis_max", "act_inf_norm_max", "act_kurtosis_mean"):
        assert h["summary"][k] == pytest.approx(c["summary"][k], rel=1e-5), k


@pytest.mark.slow
def test_a_hub_name_without_the_network_is_a_one_line_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    p = subprocess.run([sys.executable, "-m", "quietgpt", "train", "--init", "hf:nosuch-org/nosuch-model",
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "nosuch-org/nosuch-model is neither a local folder nor a model the Hugging Face Hub gave" in lines[0]


@pytest.mark.slow
def test_a_study_from_the_pretrained_model_with_the_int8_row(world, tmp_path):
    """`--set train.init=hf:FOLDER` in a study: every (variant, seed) starts from the pretrained weights (softmax's
    iteration-0 loss is the pretrained one, per seed), int8-dynamic reaches the rows and the report, and a rerun
    finds every run finished (run_config_record carries train.init like any field)."""
    sets = {**RUN, "train.init": f"hf:{world / 'gpt2'}", "data.source": str(world / "text.txt"),
            "data.tokenizer": "char", "data.cache_dir": str(world / "cache")}
    argv = ["study", "--out", str(tmp_path / "s"), "--variants", "softmax,softmax1", "--seeds", "2", "--jobs", "1",
            "--quant", "w8a8,int8-dynamic", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    assert main(argv) == 0
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert len(results["runs"]) == 4
    for r in results["runs"]:
        assert r["status"] == "ok", r["error"]
        assert r["ppl_int8-dynamic"] > 0 and r["ppl_ratio_int8-dynamic"] == pytest.approx(
            r["ppl_int8-dynamic"] / r["ppl"])
        doc = checkpoint.read_config(tmp_path / "s" / r["dir"])
        assert (doc["model"]["n_layer"], doc["model"]["n_embd"], doc["model"]["gelu"]) == (2, 32, "tanh")
        assert doc["init"]["from"] == sets["train.init"]
        if r["variant"] == "softmax":
            assert first_eval(tmp_path / "s" / r["dir"])["val_loss"] == pytest.approx(
                doc["init"]["pretrained_loss"]["val"], abs=1e-5)
    assert "int8-dynamic" in (tmp_path / "s" / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "runs").rglob("result.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was redone


@pytest.mark.slow
def test_sink_logit_of_minus_10_still_learns(world, tmp_path, monkeypatch):
    """Why SINK_LOGIT is -10 and not -inf: the sink's gradient is proportional to its null weight exp(b - LSE).
    At -10 AdamW still moves it as far as at -3 (Adam's step does not depend on the gradient's scale while the
    gradient is above its eps); at -20 the gradient is below eps and the sink is frozen."""
    moved = {}
    for b in (-3.0, -10.0, -20.0):
        monkeypatch.setitem(pretrained.SWAP_INITS, "sink", pretrained.SwapInit("test", config={"sink_init": b}))
        out = tmp_path / f"b{b:g}"
        train(run_config(world, out, "sink", **{"train.max_iters": 60, "train.lr_decay_iters": 60,
                                                "train.eval_interval": 60, "train.warmup_iters": 5}), progress=False)
        model, _ = checkpoint.load_model(out)
        moved[b] = max(abs(x - b) for blk in model.transformer.h for x in blk.attn.core.sink_logit.tolist())
    print("largest sink-logit move in 60 steps, by starting value:", {b: f"{m:.2e}" for b, m in moved.items()})
    assert moved[-3.0] > 1e-3
    assert moved[-10.0] > 0.5 * moved[-3.0]
    assert moved[-20.0] < 0.05 * moved[-3.0]
