"""Real int8 ("int8-dynamic", quant.int8_dynamic): PyTorch's dynamic int8 linear kernels beside the simulated grid.
Its perplexity must equal an independent computation (quantize_dynamic applied here, this file's own NLL loop),
stay close to float, reach the registry (eval JSON, study rows) and fail in one line where the kernels are missing."""

from __future__ import annotations

import copy
import json
import math
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quietgpt import GPT, GPTConfig, QuietError
from quietgpt.measurement.evaluate import measure
from quietgpt.measurement.registry import catalogue, eval_summary, study_metrics
from quietgpt.quant import dynamic
from quietgpt.quant.dynamic import int8_dynamic
from quietgpt.quant.spec import parse_quant, parse_quant_list

T, V, BATCH = 32, 40, 4


def _pattern(n: int, seed: int) -> np.ndarray:
    """A planted sequence: a period-7 walk through the vocabulary with 10% random tokens, so a trained model
    predicts it well below uniform (and quantization error shows in its perplexity)."""
    rng = np.random.default_rng(seed)
    x = (np.arange(n) * 3 + np.arange(n) // 7) % V
    noise = rng.random(n) < 0.1
    x[noise] = rng.integers(0, V, noise.sum())
    return x.astype(np.uint16)


@pytest.fixture(scope="module")
def trained():
    """(a tiny GPT trained for 60 steps on the pattern, its dataset)."""
    data = types.SimpleNamespace(train=_pattern(6000, 0), val=_pattern(1500, 1), vocab_size=V)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=32, attention="softmax1"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        ix = torch.randint(0, len(data.train) - T - 1, (8,), generator=g).tolist()
        w = torch.from_numpy(np.stack([data.train[i:i + T + 1] for i in ix]).astype(np.int64))
        _, loss = model(w[:, :-1], w[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data


def _reference_ppl(model: GPT, val: np.ndarray) -> tuple[float, nn.Module]:
    """quantize_dynamic applied here to a copy, then this file's own loop: the non-overlapping windows of T
    covering val (every token after the first predicted once), BATCH full windows per forward in order (the
    activation ranges are per forward call, so the batches must be the ones measure uses), the tail alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    starts = list(range(0, len(val) - 1, T))
    windows = [(s, min(T, len(val) - 1 - s)) for s in starts]
    full = [w for w in windows if w[1] == T]
    batches = [full[i:i + BATCH] for i in range(0, len(full), BATCH)] + [[w] for w in windows if w[1] != T]
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            x = torch.tensor(np.stack([val[s:s + k] for s, k in b]).astype(np.int64))
            y = torch.tensor(np.stack([val[s + 1:s + 1 + k] for s, k in b]).astype(np.int64))
            logits, _ = q(x)
            nll += F.cross_entropy(logits.double().reshape(-1, V), y.reshape(-1), reduction="sum").item()
            n += y.numel()
    assert n == len(val) - 1
    return math.exp(nll / n), q


# ----------------------------------------------------------------------------- the config name


def test_int8_dynamic_parses_beside_the_simulated_grid():
    c = parse_quant(" INT8-Dynamic ")
    assert (c.name, c.kind, c.w_bits, c.a_bits, c.head) == ("int8-dynamic", "dynamic", 8, 8, True)
    assert parse_quant("w8a8").kind == "simulated"
    assert [x.name for x in parse_quant_list("w8a8,int8-dynamic,w8a8")] == ["w8a8", "int8-dynamic"]
    for bad in ("int8-dynamic-pc", "int8", "int4-dynamic"):
        with pytest.raises(QuietError) as e:
            parse_quant(bad)
        assert "\n" not in str(e.value) and "int8-dynamic" in str(e.value)


# ----------------------------------------------------------------------------- the measurement


def test_int8_perplexity_equals_an_independent_computation_and_is_close_to_fp(trained):
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = measure(model, data, quant=["w8a8", "int8-dynamic"], n_sequences=4, calib_batches=2, batch_size=BATCH)
    ref, q = _reference_ppl(model, data.val)
    fp, int8 = m.perplexity["fp"], m.perplexity["int8-dynamic"]
    assert math.isfinite(int8) and fp < V / 2  # the model learnt the pattern: far from uniform
    assert int8 == pytest.approx(ref, rel=1e-6)  # float32 cross-entropy there, float64 here
    assert abs(int8 / fp - 1) < 0.03 and int8 != fp  # quantized (it moved), and close
    assert m.loss["int8-dynamic"] == pytest.approx(math.log(ref), rel=1e-6)
    # every linear layer was an int8 kernel in the reference: 4 per block and the (tied) head
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(mod, dynamic) for mod in q.modules()) == 4 * 2 + 1
    assert not any(type(mod) is nn.Linear for mod in q.modules())
    assert m.quant["int8-dynamic"]["kind"] == "dynamic"
    assert m.timings["int8-dynamic_s"] > 0 and m.timings["int8-dynamic_convert_s"] > 0 and m.timings["w8a8_s"] > 0
    # the measured model is untouched: float nn.Linear modules, the same weights, the tie intact
    assert not any(isinstance(mod, dynamic) for mod in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_int8_copy_is_quiet_and_leaves_the_model(trained):
    model, _ = trained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = int8_dynamic(model)
        with torch.no_grad():
            logits, _ = q(torch.zeros(1, T, dtype=torch.long))
    assert not [w for w in caught if "quantiz" in str(w.message)], [str(w.message)[:80] for w in caught]
    assert q is not model and isinstance(model.lm_head, nn.Linear) and logits.dtype == torch.float32
    with torch.no_grad():
        ref, _ = model(torch.zeros(1, T, dtype=torch.long))
    assert 0 < (logits - ref).abs().max() < 0.5  # int8 error: present, and small


def test_int8_on_cuda_is_a_one_line_error_before_any_work(trained):
    model, data = trained
    with pytest.raises(QuietError) as e:
        measure(model, data, quant=["w8a8", "int8-dynamic"], device="cuda")
    msg = str(e.value)
    assert "\n" not in msg and "int8-dynamic" in msg and "--device cpu" in msg and "cuda" in msg
    assert next(model.parameters()).device.type == "cpu"


def test_int8_without_a_quantized_engine_is_a_one_line_error(trained, monkeypatch):
    model, data = trained
    monkeypatch.setattr(dynamic, "quantized_engines", lambda: [])  # a torch build without fbgemm/x86/qnnpack
    with pytest.raises(QuietError) as e:
        measure(model, data, quant=["int8-dynamic"])
    msg = str(e.value)
    assert "\n" not in msg and "int8-dynamic" in msg and "quantized engine" in msg and "--quant" in msg
    monkeypatch.undo()
    assert dynamic.quantized_engines()  # this torch build has one (the tests above ran its kernels)


# ----------------------------------------------------------------------------- the registry and the CLI


def test_the_registry_carries_int8_like_w8a8():
    metrics = catalogue(["w8a8", "int8-dynamic"])
    assert "ppl_int8-dynamic" in metrics and "ppl_ratio_int8-dynamic" in metrics
    assert "quantize_dynamic" in metrics["ppl_int8-dynamic"].definition
    assert "simulated" in metrics["ppl_w8a8"].definition and "simulated" not in metrics["ppl_int8-dynamic"].definition
    assert "ppl_int8-dynamic" in study_metrics(["w8a8", "int8-dynamic"])
    s = eval_summary({"perplexity": {"fp": 10.0, "w8a8": 11.0, "int8-dynamic": 10.5}}, ["w8a8", "int8-dynamic"])
    assert s["ppl_int8-dynamic"] == 10.5 and s["ppl_ratio_int8-dynamic"] == pytest.approx(1.05)


@pytest.mark.slow
def test_eval_json_has_the_int8_row(tmp_path, capsys):
    from quietgpt.cli import main
    from quietgpt.config import load_config
    from quietgpt.data.sources import prepare
    from quietgpt.runs.checkpoint import save_checkpoint

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}: the quick brown fox, {i % 7} times.\n" for i in range(300)))
    sets = {"data.source": str(text), "data.tokenizer": "char", "data.cache_dir": str(tmp_path / "cache"),
            "model.block_size": 32, "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16}
    ds = prepare(load_config("default", sets).data)
    cfg = load_config("default", {**sets, "model.vocab_size": ds.vocab_size})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run", GPT(cfg.model), cfg, extras={"tokenizer": ds.tokenizer.to_meta()})
    out = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--quant", "w8a8,int8-dynamic", "--json", str(out),
                 "--n-sequences", "2", "--calib-batches", "2"]) == 0
    d = json.loads(out.read_text())
    assert set(d["perplexity"]) == {"fp", "tokens", "w8a8", "int8-dynamic"}
    assert d["summary"]["ppl_int8-dynamic"] == d["perplexity"]["int8-dynamic"] > 0
    assert d["timings"]["int8-dynamic_s"] > 0
    assert "int8-dynamic" in capsys.readouterr().out
