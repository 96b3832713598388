"""`quietgpt export` (quietgpt.interop.hf_export): every variant becomes a Hugging Face folder whose model computes the
checkpoint's logits (1e-5, float32) and greedy continuations, loaded offline with transformers' own Auto
classes; softmax as a plain GPT2LMHeadModel, the others through the modeling file quietgpt writes (which
must not need quietgpt), whose config carries every attention setting (gate modes, sigmoid's bias). The
tokenizer goes alongside; bad input leaves OUT as it was."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from quietgpt.cli import main
from quietgpt.config import load_config
from quietgpt.errors import QuietError
from quietgpt.interop import hf_export
from quietgpt.nn.gates import GATE_MODES
from quietgpt.nn.model import GPT
from quietgpt.nn.variants import VARIANTS as ALL_VARIANTS
from quietgpt.runs import checkpoint

transformers = pytest.importorskip("transformers")
VARIANTS = tuple(v for v in ALL_VARIANTS if v not in hf_export.NOT_EXPORTED_VARIANTS)

VOCAB, BLOCK = 40, 16
CHARS = [chr(ord("0") + i) for i in range(VOCAB)]
SETTINGS = {  # variant -> model settings beyond the tiny sizes: every option the export must carry
    "softmax": {"model.bias": True, "model.gelu": "tanh"},
    "softmax1": {},
    "softmax_n": {"model.softmax_n": 3.0, "model.bias": True},
    "sink": {"model.gelu": "tanh"},
    "clipped": {"model.clip_gamma": -0.1, "model.clip_zeta": 1.05, "model.bias": True},
    "gated": {},
    "softpick": {"model.bias": True},
    "outgate": {"model.bias": True},  # elementwise, the default mode; the others: test_every_gate_mode_...
    "sigmoid": {},  # sigmoid_bias "auto": -log T of each call; a fixed number: test_a_fixed_sigmoid_bias_...
    "kvbias": {"model.gelu": "tanh"},
}
NULL_VARIANTS = ("softmax1", "softmax_n", "sink", "kvbias")  # rows that leave mass on "nothing" (or on k')


def make_checkpoint(folder: Path, variant: str, tokenizer: dict | None = None, **extra) -> Path:
    """A tiny checkpoint of `variant` whose biases, LayerNorms, sink logits, gates and kvbias's k', v' are all
    away from their init (so a tensor the export drops or misplaces changes the logits), saved as `quietgpt
    train` saves."""
    cfg = load_config("default", {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32,
                                  "model.block_size": BLOCK, "model.vocab_size": VOCAB, "model.attention": variant,
                                  **SETTINGS[variant], **extra})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "gate" in name or name.endswith(("k_bias", "v_bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    tok = tokenizer or {"name": "char", "vocab_size": VOCAB, "chars": CHARS}
    checkpoint.save_checkpoint(folder, model, cfg, extras={"tokenizer": tok})
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """variant -> (checkpoint folder, exported folder), one export per variant."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for v in VARIANTS:
        ckpt = make_checkpoint(root / v, v)
        hf_export.export_checkpoint(ckpt, root / f"{v}-hf")
        out[v] = (ckpt, root / f"{v}-hf")
    return out


def load_hf(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()


def batch(n: int = 3, t: int = BLOCK, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_loads_with_auto_classes_and_gives_quietgpts_logits(exported, variant):
    ckpt, out = exported[variant]
    hf = load_hf(out)
    doc = json.loads((out / "config.json").read_text())
    if variant == "softmax":  # a plain GPT-2: no remote code, transformers' own class and config
        assert type(hf) is transformers.GPT2LMHeadModel and doc["model_type"] == "gpt2"
        assert "auto_map" not in doc and not (out / hf_export.MODELING_FILE).exists()
        assert doc["activation_function"] == "gelu_new" and doc["n_positions"] == BLOCK
    else:
        assert type(hf).__name__ == "QuietGPTForCausalLM" and doc["model_type"] == "quietgpt"
        assert doc["attention"] == variant and (out / hf_export.MODELING_FILE).is_file()
    ours, _ = checkpoint.load_model(ckpt)  # quietgpt's own model, its default (fast where it has one) path
    idx = batch()
    with torch.no_grad():
        expected, _ = ours(idx)
        got = hf(idx).logits
    assert got.shape == expected.shape == (3, BLOCK, VOCAB)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


OWN_PARAMETERS = {"sink": ["core.sink_logit"], "gated": ["gate.weight", "gate.bias"],
                  "outgate": ["gate.weight", "gate.bias"], "kvbias": ["core.k_bias", "core.v_bias"]}


@pytest.mark.parametrize(("variant", "name"), [(v, n) for v, ns in OWN_PARAMETERS.items() for n in ns])
def test_each_variants_own_parameters_enter_the_exported_logits(exported, variant, name):
    """Not trivially equal: moving one of the variant's own tensors (in the first block) moves the logits, so
    the modeling file reads it where quietgpt does."""
    hf = load_hf(exported[variant][1])
    idx = batch()
    with torch.no_grad():
        before = hf(idx).logits
        hf.get_parameter(f"transformer.h.0.attn.{name}").add_(0.5)
        assert (hf(idx).logits - before).abs().max() > 1e-3


@pytest.mark.parametrize(("mode", "bias"), [("elementwise", False), ("headwise", True), ("headwise", False),
                                           ("constant", False)])
def test_every_gate_mode_exports_with_quietgpts_logits(tmp_path, mode, bias):
    """outgate's three G1 gates (headwise W_g (H, C), constant: a logit per head and no W_g), with and
    without the gate's bias (it follows model.bias; the constant gate always has its logits)."""
    ckpt = make_checkpoint(tmp_path / "ck", "outgate", **{"model.gate_mode": mode, "model.bias": bias})
    s = hf_export.export_checkpoint(ckpt, tmp_path / "hf")
    assert s["max_logit_diff"] <= 1e-5
    hf, (ours, _) = load_hf(tmp_path / "hf"), checkpoint.load_model(ckpt)
    assert hf.config.gate_mode == json.loads((tmp_path / "hf" / "config.json").read_text())["gate_mode"] == mode
    gate = {k.split("gate.")[1]: tuple(v.shape) for k, v in hf.state_dict().items() if ".h.0.attn.gate." in k}
    want = {"elementwise": {"weight": (32, 32)}, "headwise": {"weight": (2, 32)}, "constant": {"bias": (2,)}}[mode]
    if bias and mode != "constant":
        want = {**want, "bias": (want["weight"][0],)}
    assert gate == want
    idx = batch()
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)


def test_sigmoid_auto_bias_follows_the_length_of_each_call(exported):
    """sigmoid_bias "auto" is b = -log T for the call's T: a shorter input gets another b, so its logits are
    not the prefix of a longer input's (it would be with a fixed b), in quietgpt and in the export alike."""
    ckpt, out = exported["sigmoid"]
    hf, (ours, _) = load_hf(out), checkpoint.load_model(ckpt)
    assert hf.config.sigmoid_bias == "auto"
    long = batch(2, BLOCK, seed=7)
    with torch.no_grad():
        for t in (1, 5, 11):
            want = ours(long[:, :t])[0]
            assert torch.allclose(hf(long[:, :t]).logits, want, atol=1e-5, rtol=0), t
        prefix = hf(long).logits[:, :5]
        assert (prefix - ours(long[:, :5])[0]).abs().max() > 1e-3  # b = -log 16 there, -log 5 here
    prompt = long[:1, :3]
    assert torch.equal(hf.generate(prompt, max_new_tokens=6, do_sample=False), ours.generate(prompt, 6, temperature=0))


def test_a_fixed_sigmoid_bias_round_trips_and_is_the_same_in_every_call(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", "sigmoid", **{"model.sigmoid_bias": "-2.5"})
    hf_export.export_checkpoint(ckpt, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["sigmoid_bias"] == -2.5
    hf, (ours, _) = load_hf(tmp_path / "hf"), checkpoint.load_model(ckpt)
    assert hf.config.sigmoid_bias == -2.5 and ours.config.sigmoid_bias == "-2.5"
    idx = batch()
    with torch.no_grad():
        full = hf(idx).logits
        assert torch.allclose(full, ours(idx)[0], atol=1e-5, rtol=0)
        assert torch.allclose(hf(idx[:, :5]).logits, full[:, :5], atol=1e-5, rtol=0)  # no length dependence
        hf.config.sigmoid_bias = -1.0  # the config is what the attention reads
        assert (hf(idx).logits - full).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["softmax_n", "clipped", "outgate", "sigmoid"])
def test_the_config_round_trips_every_attention_setting(tmp_path, variant):
    """config.json -> QuietGPTConfig -> save again: the same attention settings, and they are the checkpoint's."""
    from quietgpt.interop.hf_modeling import modeling_quietgpt as mq

    extra = {"outgate": {"model.gate_mode": "headwise"}, "sigmoid": {"model.sigmoid_bias": "-1.75"}}.get(variant, {})
    ckpt = make_checkpoint(tmp_path / "ck", variant, **extra)
    hf_export.export_checkpoint(ckpt, tmp_path / "hf")
    ours = checkpoint.load_model(ckpt)[0].config
    cfg = mq.QuietGPTConfig.from_pretrained(str(tmp_path / "hf"))
    cfg.save_pretrained(str(tmp_path / "again"))
    again = mq.QuietGPTConfig.from_pretrained(str(tmp_path / "again"))
    names = ("attention", "softmax_n", "clip_gamma", "clip_zeta", "gate_mode", "sigmoid_bias", "gelu", "bias",
             "gate_init", "sink_init")
    for name in names:
        theirs = getattr(ours, name)
        if name == "sigmoid_bias" and theirs != "auto":
            theirs = float(theirs)
        assert getattr(cfg, name) == getattr(again, name) == theirs, name
    assert (cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head) == (BLOCK, 32, 2, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_gpt_generate(exported, variant):
    ckpt, out = exported[variant]
    hf, (ours, _) = load_hf(out), checkpoint.load_model(ckpt)
    prompt = batch(2, 4, seed=3)
    want = ours.generate(prompt, 10, temperature=0)
    got = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("variant", ["softmax1", "sigmoid"])
def test_generation_past_the_block_size_crops_the_context_as_quietgpt_does(exported, variant):
    ckpt, out = exported[variant]
    hf, (ours, _) = load_hf(out), checkpoint.load_model(ckpt)
    prompt = batch(1, BLOCK - 2, seed=4)
    want = ours.generate(prompt, 9, temperature=0)  # 23 tokens > block_size 16: both see the last 16
    assert torch.equal(hf.generate(prompt, max_new_tokens=9, do_sample=False), want)


@pytest.mark.parametrize("variant", ["softmax1", "sink", "clipped", "gated", "softpick", "outgate", "sigmoid",
                                     "kvbias"])
def test_a_left_padded_batch_gives_each_rows_own_result(exported, variant):
    """attention_mask: padded keys get weight 0 and enter no denominator (softpick's sum of |exp(s) - 1|),
    positions count real tokens only, and sigmoid's "auto" bias reads the row's real length, so a left-padded
    row computes exactly what the row alone computes (generate pads this way)."""
    ckpt, out = exported[variant]
    hf, (ours, _) = load_hf(out), checkpoint.load_model(ckpt)
    short, long = batch(1, 3, seed=5), batch(1, 6, seed=6)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask).logits
        assert torch.allclose(logits[0, 3:], ours(short)[0][0], atol=1e-5, rtol=0)
        assert torch.allclose(logits[1], ours(long)[0][0], atol=1e-5, rtol=0)
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got[0, 3:], ours.generate(short, 5, temperature=0)[0])
    assert torch.equal(got[1], ours.generate(long, 5, temperature=0)[0])


@pytest.mark.parametrize("variant", ["softmax1", "softmax_n", "sink", "clipped", "softpick", "sigmoid", "kvbias"])
def test_output_attentions_are_quietgpts_probabilities(exported, variant):
    """The modeling file's own normaliser against quietgpt's reference path (softmax.py): the weights a head
    places, and for the null variants the mass it leaves on nothing (kvbias: on k'; rows summing to less
    than 1); softpick's exact zeros are zeros there too."""
    ckpt, out = exported[variant]
    hf, (ours, _) = load_hf(out), checkpoint.load_model(ckpt)
    idx = batch(2)
    seen = {}
    with torch.no_grad(), ours.observe(lambda site, layer, t: seen.__setitem__(layer, t.clone()), ("attn_probs",)):
        ours(idx)
    with torch.no_grad():
        probs = hf(idx, output_attentions=True).attentions
    assert len(probs) == 2
    for layer, p in enumerate(probs):
        assert torch.allclose(p, seen[layer], atol=1e-6, rtol=0)
    if variant in NULL_VARIANTS:
        assert (probs[0].sum(-1) < 1 - 1e-4).all()  # every row leaves some mass unassigned
    if variant == "softpick":
        visible = torch.ones(BLOCK, BLOCK, dtype=torch.bool).tril()
        zeros = (seen[0] == 0) & visible
        assert zeros.any() and torch.equal((probs[0] == 0) & visible, zeros)


@pytest.mark.parametrize("variant", ["softmax", "sink"])
def test_labels_give_quietgpts_loss(exported, variant):
    ckpt, out = exported[variant]
    hf, (ours, _) = load_hf(out), checkpoint.load_model(ckpt)
    idx = batch(2)
    with torch.no_grad():
        _, want = ours(idx[:, :-1], targets=idx[:, 1:])
        got = hf(idx, labels=idx).loss
    assert abs(float(got) - float(want)) < 1e-5


def test_the_modeling_file_imports_only_torch_and_transformers():
    folder = resources.files("quietgpt.interop.hf_modeling")
    source = folder.joinpath(hf_export.MODELING_FILE).read_text(encoding="utf-8")
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import would need files beside it"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "math", "torch", "transformers"}, roots


@pytest.mark.slow
def test_an_export_loads_in_a_fresh_process_where_quietgpt_cannot_be_imported(exported, tmp_path):
    """What a user without quietgpt runs: offline, an empty modules cache, `import quietgpt` failing."""
    ckpt, out = exported["sink"]
    ours, _ = checkpoint.load_model(ckpt)
    with torch.no_grad():
        want = ours(batch(1))[0][0, -1].tolist()
    code = ("import sys, json, torch; sys.modules['quietgpt'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
            f"idx = torch.tensor([{batch(1)[0].tolist()}])\n"
            "with torch.no_grad(): print(json.dumps(m(idx).logits[0, -1].tolist()))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


def test_bfloat16_export_stores_bfloat16_weights(tmp_path):
    from safetensors import safe_open

    ckpt = make_checkpoint(tmp_path / "ck", "sink")
    s = hf_export.export_checkpoint(ckpt, tmp_path / "hf", dtype="bfloat16")
    assert s["dtype"] == "bfloat16" and s["max_logit_diff"] <= 1e-5  # the check runs in float32
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_json_encodes_as_quietgpt_does(exported):
    from quietgpt.data.tokenizers import CharTokenizer

    doc = json.loads((exported["softmax1"][1] / hf_export.TOKENIZER_FILE).read_text(encoding="utf-8"))
    assert doc["type"] == "char" and doc["itos"] == CHARS and doc["vocab_size"] == VOCAB
    text = "0123:;<=>?@ABCW"
    assert [doc["itos"].index(c) for c in text] == CharTokenizer(CHARS).encode(text)  # the documented recipe


@pytest.mark.parametrize("name", ["byte", "synthetic"])
def test_byte_and_synthetic_tokenizers_are_documented_json(tmp_path, name):
    from quietgpt.data.tokenizers import get_tokenizer

    tok = get_tokenizer(name)
    ckpt = make_checkpoint(tmp_path / "ck", "softmax1", tokenizer=tok.to_meta(), **{"model.vocab_size": tok.vocab_size})
    s = hf_export.export_checkpoint(ckpt, tmp_path / "hf")
    doc = json.loads((tmp_path / "hf" / hf_export.TOKENIZER_FILE).read_text(encoding="utf-8"))
    assert doc["type"] == name and doc["vocab_size"] == tok.vocab_size and name in s["tokenizer"]
    if name == "byte":
        text = "naïve café"
        assert list(text.encode("utf-8")) == tok.encode(text)
    else:
        text = "NEW SET k3 v7 f12 GET k3"
        assert [doc["itos"].index(w) for w in text.split()] == tok.encode(text)


def test_gpt2_bpe_becomes_a_transformers_tokenizer_that_encodes_as_tiktoken(tmp_path, monkeypatch,
                                                                          shakespeare_path, small_bpe):
    tiktoken = pytest.importorskip("tiktoken")
    pytest.importorskip("regex")
    text = shakespeare_path.read_text(encoding="utf-8")
    enc = small_bpe(text[:20000])
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
    meta = {"name": "gpt2", "vocab_size": enc.n_vocab}
    ckpt = make_checkpoint(tmp_path / "ck", "softmax", tokenizer=meta, **{"model.vocab_size": 448})
    s = hf_export.export_checkpoint(ckpt, tmp_path / "hf")
    assert s["tokenizer"].startswith("tokenizer: GPT-2 BPE")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for sample in (text[30000:32000], text[-3000:], "It's 2024 -- naïve café, 'tis\n\n  tabs\there  ", " ☃ 🙂x"):
        ids = tok(sample)["input_ids"]
        assert ids == enc.encode_ordinary(sample)
        assert tok.decode(ids) == sample
    assert tok.convert_tokens_to_ids("<|endoftext|>") == enc.eot_token


def test_gpt2_bpe_without_tiktokens_files_exports_the_model_and_says_why_not_the_tokenizer(tmp_path, monkeypatch,
                                                                                          capsys):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    ckpt = make_checkpoint(tmp_path / "ck", "softmax1", tokenizer={"name": "gpt2", "vocab_size": 50257})
    assert main(["export", "--checkpoint", str(ckpt), "--hf", str(tmp_path / "hf")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("no tokenizer saved: cannot load tiktoken's gpt2 encoding (Failed to resolve")
    assert "TIKTOKEN_CACHE_DIR" in lines[-1] and "--set" not in lines[-1]
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in names and not names & {"tokenizer.json", hf_export.TOKENIZER_FILE}


# ----------------------------------------------------------------------------- the CLI and the folder


def test_cli_export_says_how_to_load_it(exported, tmp_path, capsys):
    ckpt, _ = exported["gated"]
    assert main(["export", "--checkpoint", str(ckpt), "--hf", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "trust_remote_code=True" in out and "max |logit difference|" in out
    prov = json.loads((tmp_path / "out" / hf_export.PROVENANCE_FILE).read_text())
    assert prov["attention"] == "gated" and prov["checkpoint"] == str(ckpt) and prov["max_logit_diff"] < 1e-5


def test_an_empty_out_folder_is_used_and_a_full_one_refused_unless_force(exported, tmp_path):
    ckpt, _ = exported["softmax1"]
    out = tmp_path / "out"
    out.mkdir()
    hf_export.export_checkpoint(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(QuietError, match="exists and is not empty; pass a new folder, or --force"):
        hf_export.export_checkpoint(exported["sink"][0], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "stale.txt").write_text("from an older export")
    hf_export.export_checkpoint(exported["sink"][0], out, force=True)
    assert json.loads((out / "config.json").read_text())["attention"] == "sink"
    assert not (out / "stale.txt").exists()  # replaced as a whole, not overlaid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_force_never_replaces_a_folder_that_holds_no_model_or_the_checkpoint(exported, tmp_path):
    ckpt, _ = exported["softmax"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    with pytest.raises(QuietError, match="holds no model"):
        hf_export.export_checkpoint(ckpt, notes, force=True)
    assert (notes / "thesis.tex").read_text() == "precious"
    with pytest.raises(QuietError, match="holds the checkpoint"):
        hf_export.export_checkpoint(ckpt, ckpt, force=True)
    with pytest.raises(QuietError, match="holds the checkpoint"):
        hf_export.export_checkpoint(ckpt, ckpt.parent, force=True)
    assert checkpoint.load_model(ckpt)


def test_a_failure_while_writing_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    def full_disk(meta, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_export, "write_tokenizer", full_disk)
    with pytest.raises(QuietError, match="No space left on device"):
        hf_export.export_checkpoint(exported["sink"][0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_would_differ_is_never_published(exported, tmp_path, monkeypatch):
    """The in-memory check compares before anything is written: a conversion bug is an error, not a file."""
    real = hf_export.to_quietgpt_hf

    def off_by_a_bit(model, eos):
        hf = real(model, eos)
        with torch.no_grad():
            hf.transformer.ln_f.weight.mul_(1.01)
        return hf

    monkeypatch.setattr(hf_export, "to_quietgpt_hf", off_by_a_bit)
    with pytest.raises(RuntimeError, match="differ from the checkpoint's"):
        hf_export.export_checkpoint(exported["sink"][0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "words"), [
    (["--checkpoint", "{t}/missing", "--hf", "{t}/out"], "does not exist"),
    (["--checkpoint", "{ck}", "--hf", "{t}/out", "--dtype", "int8"], "unknown --dtype 'int8'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(exported, tmp_path, capsys, argv, words):
    argv = [a.replace("{t}", str(tmp_path)).replace("{ck}", str(exported["sink"][0])) for a in argv]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quietgpt export: error: ") and len(err.strip().splitlines()) == 1 and words in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- eval --hf on the export


def test_eval_hf_of_an_exported_softmax_model_gives_the_checkpoints_perplexity(tmp_path, shakespeare_path, capsys):
    """Trained on a text file with the char tokenizer; eval --hf is told --tokenizer char (it picks its
    tokenizer by flag, not from the export), so both evaluations read the same tokens."""
    from quietgpt.training.loop import train

    data = tmp_path / "text.txt"
    data.write_text(shakespeare_path.read_text(encoding="utf-8")[:40000], encoding="utf-8")
    run = tmp_path / "run"
    train(load_config("default", {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
                                  "train.batch_size": 4, "train.max_iters": 5, "train.lr_decay_iters": 5,
                                  "train.warmup_iters": 1, "train.eval_interval": 5, "train.eval_iters": 2,
                                  "train.threads": 1, "data.source": str(data), "data.tokenizer": "char",
                                  "data.cache_dir": str(tmp_path / "cache"), "train.out_dir": str(run)}),
          progress=False)
    assert main(["export", "--checkpoint", str(run), "--hf", str(tmp_path / "hf")]) == 0
    common = ["--data", str(data), "--quant", "w8a8", "--n-sequences", "4", "--calib-batches", "2"]
    assert main(["eval", "--checkpoint", str(run), *common, "--json", str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--hf", str(tmp_path / "hf"), "--tokenizer", "char", "--cache-dir", str(tmp_path / "cache"),
                 *common, "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["perplexity"] for n in "ab")
    assert a["tokens"] == b["tokens"] > 0
    for key in ("fp", "w8a8"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_the_modeling_file_implements_every_quietgpt_variant_and_gate_mode():
    """A variant added to quietgpt fails here until modeling_quietgpt.py computes it (the export would
    otherwise stop at QuietGPTConfig's ValueError)."""
    from quietgpt.interop.hf_modeling import modeling_quietgpt as mq

    assert mq.VARIANTS == VARIANTS and mq.GATE_MODES == GATE_MODES
    assert set(SETTINGS) == set(VARIANTS)


@pytest.mark.parametrize("setting", [{"model.attention": "diff"}, {"model.norm": "rmsnorm"}, {"model.norm": "ssnorm"},
                                     {"model.block": "op"}, {"model.embed_proj": True}])
def test_what_the_modeling_file_does_not_compute_is_refused_in_one_line(tmp_path, capsys, setting):
    """The recipes' norms, block and projections and the diff variant are refused, naming the setting, and
    nothing is written."""
    cfg = load_config("default", {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": BLOCK,
                                  "model.vocab_size": VOCAB, **setting})
    torch.manual_seed(0)
    ckpt = tmp_path / "ck"
    checkpoint.save_checkpoint(ckpt, GPT(cfg.model), cfg)
    assert main(["export", "--checkpoint", str(ckpt), "--hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    key, value = next(iter(setting.items()))
    assert len(err.strip().splitlines()) == 1 and f"{key}={value}" in err and "quietgpt checkpoint" in err
    assert not (tmp_path / "out").exists()
