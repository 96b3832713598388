"""Checkpoints: safetensors round trip (tied weights stored once), and one-line errors for missing,
truncated, corrupt, unsafe or mismatched checkpoints that leave the files on disk untouched."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quietgpt.config import RunConfig, apply_overrides
from quietgpt.errors import QuietError
from quietgpt.nn.model import GPT
from quietgpt.runs import checkpoint as ckpt


def small_cfg(**over) -> RunConfig:
    base = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 8,
            "model.vocab_size": 11, "model.bias": True}
    return apply_overrides(RunConfig(), {**base, **over})


def trained_like(cfg: RunConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    with torch.no_grad():  # move every parameter off its init value so a skipped load would show
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_round_trip_tensors_equal_and_tie_stored_once(tmp_path):
    cfg = small_cfg()
    model = trained_like(cfg)
    ckpt.save_checkpoint(tmp_path, model, cfg, extras={"tokenizer": {"name": "byte"}})
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    assert meta["format"] == "quietgpt"
    loaded, cfg2 = ckpt.load_model(tmp_path)
    assert cfg2 == cfg and not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    # the tie survives loading: one Parameter, so training the loaded model keeps them equal
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["tokenizer"] == {"name": "byte"} and doc["model"] == cfg.model.to_dict()
    x = torch.randint(0, 11, (2, 8))
    assert torch.equal(model.eval()(x)[0], loaded(x)[0])


def test_round_trip_extra_parameters_of_variants(tmp_path):
    for variant in ("sink", "gated"):
        cfg = small_cfg(**{"model.attention": variant})
        model = trained_like(cfg, seed=1)
        ckpt.save_checkpoint(tmp_path / variant, model, cfg)
        loaded, _ = ckpt.load_model(tmp_path / variant)
        for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), k


def test_load_model_does_not_touch_global_rng(tmp_path):
    cfg = small_cfg()
    ckpt.save_checkpoint(tmp_path, trained_like(cfg), cfg)
    before = torch.get_rng_state()
    ckpt.load_model(tmp_path)
    assert torch.equal(before, torch.get_rng_state())


def test_train_state_is_self_contained_and_weights_only(tmp_path):
    cfg = small_cfg()
    model = trained_like(cfg)
    state = {"iter": 7, "best_val_loss": 1.5, "optimizer": {"state": {}, "param_groups": []},
             "rng": {"torch": torch.get_rng_state()}}
    ckpt.save_checkpoint(tmp_path, model, cfg, state)
    loaded = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert loaded["iter"] == 7 and loaded["config"] == cfg.to_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert ckpt.load_train_state(tmp_path)["step_id"] == json.loads((tmp_path / "config.json").read_text())["step_id"]


@pytest.mark.parametrize("damage", ["missing_dir", "no_config", "no_weights", "truncated_weights",
                                    "garbage_weights", "corrupt_config", "other_architecture"])
def test_load_model_errors(tmp_path, damage):
    cfg = small_cfg()
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, trained_like(cfg), cfg)
    target = run
    if damage == "missing_dir":
        target = tmp_path / "nope"
    elif damage == "no_config":
        (run / "config.json").unlink()
    elif damage == "no_weights":
        (run / "model.safetensors").unlink()
    elif damage == "truncated_weights":
        data = (run / "model.safetensors").read_bytes()
        (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage_weights":
        (run / "model.safetensors").write_bytes(b"\x00" * 100)
    elif damage == "corrupt_config":
        (run / "config.json").write_text("{not json")
    elif damage == "other_architecture":
        doc = json.loads((run / "config.json").read_text())
        doc["model"]["n_layer"] = 3
        (run / "config.json").write_text(json.dumps(doc))
    before = digest(tmp_path)
    with pytest.raises(QuietError) as e:
        ckpt.load_model(target)
    one_line(e)
    assert digest(tmp_path) == before  # loading never writes


def test_load_train_state_errors(tmp_path):
    with pytest.raises(QuietError, match="nothing to resume"):
        ckpt.load_train_state(tmp_path)
    cfg = small_cfg()
    ckpt.save_checkpoint(tmp_path, trained_like(cfg), cfg, {"iter": 1, "best_val_loss": 2.0, "optimizer": {},
                                                              "rng": {}})
    data = (tmp_path / "train_state.pt").read_bytes()
    (tmp_path / "train_state.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(QuietError, match="truncated") as e:
        ckpt.load_train_state(tmp_path)
    one_line(e)
    torch.save({"hello": 1}, tmp_path / "train_state.pt")
    with pytest.raises(QuietError, match="not a quietgpt resume point"):
        ckpt.load_train_state(tmp_path)


class _Boom:
    """A pickle payload: unpickling it would create a file (calls Path.touch)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format_version": 1, "iter": 0, "model": {}, "optimizer": {}, "config": {},
                "rng": _Boom(str(marker))}, tmp_path / "train_state.pt")
    with pytest.raises(QuietError, match="unsafe") as e:
        ckpt.load_train_state(tmp_path)
    one_line(e)
    assert not marker.exists()


@pytest.mark.parametrize("fail_on", ["train_state.pt", "model.safetensors", "config.json"])
def test_full_disk_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_on):
    cfg = small_cfg()
    state = {"iter": 1, "best_val_loss": 2.0, "optimizer": {}, "rng": {}}
    ckpt.save_checkpoint(tmp_path, trained_like(cfg, 0), cfg, state)
    before = digest(tmp_path)
    real_replace = os.replace

    def full_disk(src, dst):
        if Path(dst).name == fail_on:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(QuietError, match="No space left") as e:
        ckpt.save_checkpoint(tmp_path, trained_like(cfg, 1), cfg, {**state, "iter": 2})
    one_line(e)
    monkeypatch.undo()
    after = digest(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # temp files removed
    # the file that failed is the old one; files before it in the write order may be new, but the resume
    # point (train_state.pt, written first) is always a complete checkpoint of one step
    assert after[fail_on] == before[fail_on]
    st = ckpt.load_train_state(tmp_path)
    assert st["iter"] in (1, 2)
    ckpt.load_model(tmp_path)  # and the exported weights load


def test_check_compatible_names_the_key():
    cfg = small_cfg()
    with pytest.raises(QuietError, match=r"model.n_layer=3") as e:
        ckpt.check_compatible({"model": {**cfg.model.to_dict(), "n_layer": 3}}, cfg, "out")
    one_line(e)
    with pytest.raises(QuietError, match="vocabulary"):
        ckpt.check_compatible({"model": {**cfg.model.to_dict(), "vocab_size": 12}}, cfg, "out")
    ckpt.check_compatible({"model": {**cfg.model.to_dict(), "dropout": 0.3}}, cfg, "out")  # not architecture


def test_cuda_kernel_is_recorded_and_old_configs_without_it_load(tmp_path):
    """model.cuda_kernel is written to config.json; a config.json from before the field existed loads
    with "auto" (the behaviour those runs had), and a resume from it is not an architecture change."""
    cfg = small_cfg(**{"model.cuda_kernel": "flash"})
    model = trained_like(cfg)
    ckpt.save_checkpoint(tmp_path / "new", model, cfg)
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model"]["cuda_kernel"] == "flash"
    assert ckpt.load_model(tmp_path / "new")[1].model.cuda_kernel == "flash"
    old = small_cfg()
    ckpt.save_checkpoint(tmp_path / "old", trained_like(old), old)
    doc = json.loads((tmp_path / "old" / "config.json").read_text())
    del doc["model"]["cuda_kernel"]  # as an older quietgpt wrote it
    (tmp_path / "old" / "config.json").write_text(json.dumps(doc))
    loaded, cfg2 = ckpt.load_model(tmp_path / "old")
    assert cfg2.model.cuda_kernel == "auto" and cfg2 == old
    assert {b.attn.core.opts.cuda_kernel for b in loaded.transformer.h} == {"auto"}
    ckpt.check_compatible(doc, cfg, "old")  # resuming it with another kernel preference is allowed
