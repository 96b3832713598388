"""`quietgpt eval` end to end: a saved checkpoint, a saved Hugging Face GPT-2, and bad inputs (exit 2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quietgpt import GPT
from quietgpt.cli import main

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, twice {i % 7}.\n" for i in range(400))


def run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    rc = main(argv)
    return rc, capsys.readouterr().err


def one_line_error(err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("quietgpt eval: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, err)


def test_unknown_quant_config_exits_2(tmp_path, capsys):
    rc, err = run(["eval", "--checkpoint", str(tmp_path), "--quant", "w8a8,int4", "--json", str(tmp_path / "o.json")],
                  capsys)
    assert rc == 2
    one_line_error(err, "'int4'", "w<bits>a<bits>")
    assert not (tmp_path / "o.json").exists()


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    rc, err = run(["eval", "--checkpoint", str(tmp_path / "nope"), "--json", str(tmp_path / "o.json")], capsys)
    assert rc == 2
    one_line_error(err, "nope")


def test_checkpoint_xor_hf(tmp_path, capsys):
    rc, err = run(["eval", "--json", str(tmp_path / "o.json")], capsys)
    assert rc == 2
    one_line_error(err, "--checkpoint", "--hf")
    rc, err = run(["eval", "--hf", str(tmp_path), "--json", str(tmp_path / "o.json")], capsys)
    assert rc == 2
    one_line_error(err, "--data")


def test_unknown_device_exits_2(tmp_path, capsys):
    rc, err = run(["eval", "--checkpoint", str(tmp_path), "--device", "tpu", "--json", str(tmp_path / "o.json")],
                  capsys)
    assert rc == 2
    one_line_error(err, "tpu")


def test_hf_folder_missing_exits_2(tmp_path, capsys):
    rc, err = run(["eval", "--hf", str(tmp_path / "nothing"), "--data", str(tmp_path / "t.txt"),
                   "--json", str(tmp_path / "o.json")], capsys)
    assert rc == 2
    one_line_error(err, "config.json")


# ----------------------------------------------------------------------------- end to end (needs data.py)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def _checkpoint(tmp_path, text_file, attention="softmax1"):
    from quietgpt.config import load_config
    from quietgpt.data.sources import prepare
    from quietgpt.runs.checkpoint import save_checkpoint

    cfg = load_config("default", {"data.source": str(text_file), "data.tokenizer": "char",
                                  "data.cache_dir": str(tmp_path / "cache"), "model.block_size": 32,
                                  "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16,
                                  "model.attention": attention})
    ds = prepare(cfg.data)
    cfg = load_config("default", {**{f"data.{k}": v for k, v in vars(cfg.data).items()},
                                  "model.block_size": 32, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16,
                                  "model.attention": attention, "model.vocab_size": ds.vocab_size})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    out = tmp_path / f"run-{attention}"
    save_checkpoint(out, model, cfg, extras={"tokenizer": ds.tokenizer.to_meta(), "dataset": ds.meta})
    return out, model, ds


@pytest.mark.slow
def test_eval_checkpoint_end_to_end(tmp_path, text_file, capsys):
    from quietgpt.measurement.evaluate import measure

    ckpt, model, ds = _checkpoint(tmp_path, text_file)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--checkpoint", str(ckpt), "--quant", "w8a8,w4a8", "--json", str(out),
               "--n-sequences", "4", "--calib-batches", "2"])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(out.read_text())
    assert set(d["perplexity"]) == {"fp", "tokens", "w8a8", "w4a8"}
    assert d["perplexity"]["tokens"] == len(ds.val) - 1
    assert d["checkpoint"] == str(ckpt) and d["n_sequences"] == 4
    assert len(d["attention"]) == 2 * 2 and d["summary"]["unassigned_mass_mean"] > 0
    direct = measure(model, ds, quant=(), n_sequences=4)
    assert d["perplexity"]["fp"] == pytest.approx(direct.perplexity["fp"], rel=1e-6)
    assert "perplexity fp" in capsys.readouterr().out


def test_eval_on_data_with_another_vocabulary_exits_2(tmp_path, text_file, capsys):
    ckpt, _, _ = _checkpoint(tmp_path, text_file)
    other = tmp_path / "other.txt"
    other.write_text("ZYXWVUTSRQPONMLKJIHGFEDCBA 0123456789 !?;:" * 200, encoding="utf-8")
    rc, err = run(["eval", "--checkpoint", str(ckpt), "--data", str(other), "--json", str(tmp_path / "o.json")],
                  capsys)
    assert rc == 2
    one_line_error(err)
    assert "vocabulary" in err or "tokenizer" in err
    assert not (tmp_path / "o.json").exists()


def _hf_model(tmp_path, vocab: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path / f"hf{vocab}"
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.slow
def test_eval_hf_gpt2_matches_transformers(tmp_path, text_file, capsys):
    from quietgpt.config import DataConfig
    from quietgpt.data.sources import prepare

    hf, path = _hf_model(tmp_path, 256)
    out = tmp_path / "hf.json"
    cache = str(tmp_path / "cache")
    rc = main(["eval", "--hf", str(path), "--data", str(text_file), "--tokenizer", "byte", "--cache-dir", cache,
               "--quant", "w8a8", "--n-sequences", "4", "--calib-batches", "2", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(out.read_text())
    val = prepare(DataConfig(source=str(text_file), tokenizer="byte", cache_dir=cache)).val
    nll, n = 0.0, 0
    with torch.no_grad():  # transformers' own forward over the same non-overlapping windows
        for s in range(0, len(val) - 1, 32):
            chunk = torch.from_numpy(np.asarray(val[s:s + 33]).astype(np.int64))
            logits = hf(chunk[None, :-1]).logits[0]
            nll += float(F.cross_entropy(logits.double(), chunk[1:], reduction="sum"))
            n += chunk.numel() - 1
    assert d["perplexity"]["tokens"] == n
    assert d["perplexity"]["fp"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert d["perplexity"]["w8a8"] > 0


def test_eval_hf_with_too_small_vocabulary_exits_2(tmp_path, text_file, capsys):
    _, path = _hf_model(tmp_path, 64)
    rc, err = run(["eval", "--hf", str(path), "--data", str(text_file), "--tokenizer", "byte",
                   "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "o.json")], capsys)
    assert rc == 2
    one_line_error(err, "vocabulary")


def test_hf_gpt2_measured_like_transformers_without_data_module(tmp_path):
    import types

    from quietgpt.interop.hf_import import load_hf_gpt2
    from quietgpt.measurement.evaluate import measure

    hf, path = _hf_model(tmp_path, 64)
    model = load_hf_gpt2(path)
    rng = np.random.default_rng(0)
    ds = types.SimpleNamespace(train=rng.integers(0, 64, 2000), val=rng.integers(0, 64, 300), vocab_size=64)
    m = measure(model, ds, quant=("w16a16",), n_sequences=2, calib_batches=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ds.val) - 1, 32):
            chunk = torch.from_numpy(ds.val[s:s + 33].astype(np.int64))
            nll += float(F.cross_entropy(hf(chunk[None, :-1]).logits[0].double(), chunk[1:], reduction="sum"))
            n += chunk.numel() - 1
    assert m.perplexity["tokens"] == n
    assert m.perplexity["fp"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert m.perplexity["w16a16"] == pytest.approx(m.perplexity["fp"], rel=1e-3)


def test_eval_checkpoint_advice_never_names_set(tmp_path, text_file, capsys):
    """eval has no --set: data.py's `--set data.tokenizer=...` advice must not reach an eval user."""
    ckpt, _, _ = _checkpoint(tmp_path, text_file)
    rc, err = run(["eval", "--checkpoint", str(ckpt), "--data", "synthetic", "--json", str(tmp_path / "o.json")],
                  capsys)
    assert rc == 2
    one_line_error(err, "--data")
    assert "--set" not in err, err
