"""Hugging Face GPT-2 import (interop/hf_import.py): every option it accepts gives transformers' own logits, and every
option it cannot reproduce is a one-line QuietError naming the field and its value (`eval --hf`: exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from quietgpt.cli import main
from quietgpt.errors import QuietError
from quietgpt.interop.hf_import import from_hf, load_hf_gpt2

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)


def _config(**kw):
    return transformers.GPT2Config(**{**SMALL, **kw})


def _perturb(model) -> None:
    """Non-trivial biases and LayerNorm parameters, so the comparison sees every tensor."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _save(folder, model_cls=None, **kw):
    torch.manual_seed(0)
    model = (model_cls or transformers.GPT2LMHeadModel)(_config(**kw))
    _perturb(model)
    model.save_pretrained(str(folder))
    return folder


def _reference_logits(folder, idx, **load_kw):
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder), **load_kw).eval()
    with torch.no_grad():
        return hf(idx).logits


def _assert_same_logits(folder, **load_kw):
    idx = torch.randint(0, SMALL["vocab_size"], (3, SMALL["n_positions"]), generator=torch.Generator().manual_seed(2))
    expected = _reference_logits(folder, idx, **load_kw)
    ours = load_hf_gpt2(folder)
    with torch.no_grad():
        got, _ = ours(idx)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    return ours


def _one_line_refusal(folder, *words):
    with pytest.raises(QuietError) as e:
        load_hf_gpt2(folder)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot import {folder}"), msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ----------------------------------------------------------------------------- what it reproduces


@pytest.mark.parametrize(("act", "gelu"), [("gelu", "none"), ("gelu_python", "none"), ("gelu_new", "tanh"),
                                           ("gelu_pytorch_tanh", "tanh"), ("gelu_python_tanh", "tanh"),
                                           ("gelu_fast", "tanh"), ("gelu_accurate", "tanh")])
def test_every_accepted_gelu_matches_transformers(tmp_path, act, gelu):
    ours = _assert_same_logits(_save(tmp_path / act, activation_function=act))
    assert ours.config.gelu == gelu and ours.config.attention == "softmax" and ours.config.bias


def test_reorder_and_upcast_attn_is_the_same_computation_in_fp32(tmp_path):
    """transformers runs its reordered, upcast attention on the eager path only: compare with that one."""
    folder = _save(tmp_path / "reorder", reorder_and_upcast_attn=True)
    _assert_same_logits(folder, attn_implementation="eager")
    _assert_same_logits(folder)


def test_explicit_defaults_are_accepted(tmp_path):
    _assert_same_logits(_save(tmp_path / "explicit", n_inner=4 * SMALL["n_embd"], layer_norm_epsilon=1e-5,
                              scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False))


def test_untied_lm_head_equal_to_wte_is_accepted(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(_config(tie_word_embeddings=False))
    _perturb(hf)
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.transformer.wte.weight)
    hf.save_pretrained(str(tmp_path / "untied-equal"))
    _assert_same_logits(tmp_path / "untied-equal")


def test_a_saved_gpt2model_is_the_tied_language_model(tmp_path):
    _assert_same_logits(_save(tmp_path / "bare", model_cls=transformers.GPT2Model))


def test_from_hf_of_a_model_in_memory_matches_and_refuses_the_same(tmp_path):

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(_config(activation_function="gelu_fast")).eval()
    _perturb(hf)
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        assert torch.allclose(from_hf(hf).eval()(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    with pytest.raises(QuietError, match="activation_function='relu'"):
        from_hf(transformers.GPT2LMHeadModel(_config(activation_function="relu")))


# ----------------------------------------------------------------------------- what it refuses


@pytest.mark.parametrize(("kw", "words"), [
    ({"activation_function": "relu"}, ["activation_function='relu'"]),
    ({"activation_function": "quick_gelu"}, ["activation_function='quick_gelu'"]),
    ({"scale_attn_weights": False}, ["scale_attn_weights=False"]),
    ({"scale_attn_by_inverse_layer_idx": True}, ["scale_attn_by_inverse_layer_idx=True"]),
    ({"add_cross_attention": True}, ["add_cross_attention=True"]),
    ({"layer_norm_epsilon": 1e-6}, ["layer_norm_epsilon=1e-06"]),
    ({"n_inner": 48}, ["n_inner=48", "128"]),
    ({"tie_word_embeddings": False}, ["tie_word_embeddings=False", "lm_head"]),
])
def test_options_it_cannot_reproduce_are_refused(tmp_path, kw, words):
    _one_line_refusal(_save(tmp_path / "m", **kw), *words)


def test_another_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32))
    llama.save_pretrained(str(tmp_path / "llama"))
    _one_line_refusal(tmp_path / "llama", "model_type='llama'", "GPT-2")


def test_a_gpt2_with_another_head_is_refused(tmp_path):
    _one_line_refusal(_save(tmp_path / "double", model_cls=transformers.GPT2DoubleHeadsModel),
                      "architectures=['GPT2DoubleHeadsModel']")


def test_a_quantized_gpt2_is_refused(tmp_path):
    folder = _save(tmp_path / "q")
    doc = json.loads((folder / "config.json").read_text())
    doc["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (folder / "config.json").write_text(json.dumps(doc))
    _one_line_refusal(folder, "quantization_config", "bitsandbytes")


def _rewrite_weights(folder, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def test_missing_weights_are_refused_not_left_random(tmp_path):
    folder = _save(tmp_path / "missing")
    _rewrite_weights(folder, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"))
    _one_line_refusal(folder, "transformer.h.1.mlp.c_fc.weight", "random")


def test_unexpected_weights_are_refused(tmp_path):
    folder = _save(tmp_path / "extra")
    _rewrite_weights(folder, lambda sd: sd.update({"transformer.h.0.attn.rotary.weight": torch.ones(4)}))
    _one_line_refusal(folder, "transformer.h.0.attn.rotary.weight")


def test_state_dict_form_checks_its_keys_and_head():
    from quietgpt.interop.hf_import import check_config

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(_config())
    cfg = check_config(hf.config)
    sd = dict(hf.state_dict())
    with pytest.raises(QuietError, match=r"unexpected transformer\.h\.0\.extra"):
        from_hf({**sd, "transformer.h.0.extra": torch.zeros(1)}, config=cfg)
    with pytest.raises(QuietError, match="tie_word_embeddings=False"):
        from_hf({**sd, "lm_head.weight": torch.zeros_like(sd["lm_head.weight"])}, config=cfg)


@pytest.mark.parametrize(("kind", "words"), [("llama", "model_type='llama'"), ("relu", "activation_function='relu'")])
def test_eval_hf_refusal_is_exit_2_and_one_line(tmp_path, capsys, kind, words):
    if kind == "llama":
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32)).save_pretrained(str(tmp_path / kind))
    else:
        _save(tmp_path / kind, activation_function="relu")
    (tmp_path / "t.txt").write_text("some text to evaluate on\n" * 50)
    capsys.readouterr()
    rc = main(["eval", "--hf", str(tmp_path / kind), "--data", str(tmp_path / "t.txt"), "--tokenizer", "byte",
               "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("quietgpt eval: error: cannot import"), err
    assert words in lines[0]
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("failure", ["no tiktoken", "offline"])
def test_eval_hf_tokenizer_advice_names_what_eval_takes(tmp_path, capsys, monkeypatch, failure):
    """The gpt2 tokenizer cannot load: the advice is eval's --tokenizer, not train's --set data.tokenizer."""
    import sys

    if failure == "no tiktoken":
        monkeypatch.setitem(sys.modules, "tiktoken", None)
    else:
        tiktoken = pytest.importorskip("tiktoken")

        def offline(name):
            raise ConnectionError("network is unreachable")

        monkeypatch.setattr(tiktoken, "get_encoding", offline)
    folder = _save(tmp_path / "m")
    (tmp_path / "t.txt").write_text("some text to evaluate on\n" * 50)
    capsys.readouterr()
    rc = main(["eval", "--hf", str(folder), "--data", str(tmp_path / "t.txt"), "--tokenizer", "gpt2",
               "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("quietgpt eval: error:"), err
    assert "--tokenizer char" in lines[0] and "--set" not in lines[0], lines[0]


def test_eval_hf_vocabulary_too_small_for_the_tokenizer_names_tokenizer(tmp_path, capsys):
    folder = _save(tmp_path / "m")  # 64 tokens; bytes need 256
    (tmp_path / "t.txt").write_text("some text to evaluate on\n" * 50)
    capsys.readouterr()
    rc = main(["eval", "--hf", str(folder), "--data", str(tmp_path / "t.txt"), "--tokenizer", "byte",
               "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--tokenizer byte gives a vocabulary of 256 tokens" in err and "--set" not in err, err
