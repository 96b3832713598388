"""Config loading: presets, user TOML files, overrides and their precedence, and the errors for bad keys."""

import math

import pytest

from quietgpt.cli import main
from quietgpt.config import RunConfig, apply_overrides, load_config, parse_assignments
from quietgpt.errors import ConfigError, QuietError
from quietgpt.presets import preset_names, preset_text, read_toml
from quietgpt.training.schedule import get_lr


def test_all_presets_load_and_nanogpt_numbers():
    assert {"default", "shakespeare-char-cpu", "shakespeare-char", "gpt2-small", "tinystories"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.model.n_embd % cfg.model.n_head == 0
    # nanoGPT's CPU example, flag by flag (README: "I only have a macbook")
    c = load_config("shakespeare-char-cpu")
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size) == (4, 4, 128, 64)
    assert (c.model.dropout, c.model.bias) == (0.0, False)
    t = c.train
    assert (t.batch_size, t.max_iters, t.lr_decay_iters, t.warmup_iters) == (12, 2000, 2000, 100)
    assert (t.learning_rate, t.min_lr, t.beta2, t.weight_decay, t.grad_clip) == (1e-3, 1e-4, 0.99, 0.1, 1.0)
    assert (t.eval_iters, t.eval_interval, c.data.source) == (20, 250, "shakespeare_char")
    b = load_config("shakespeare-char")
    assert (b.model.n_layer, b.model.n_head, b.model.n_embd, b.model.block_size) == (6, 6, 384, 256)
    assert b.model.dropout == 0.2
    assert (b.train.batch_size, b.train.max_iters, b.train.eval_iters) == (64, 5000, 200)
    g = load_config("gpt2-small")
    assert (g.model.n_layer, g.model.n_head, g.model.n_embd, g.model.block_size) == (12, 12, 768, 1024)
    assert g.data.tokenizer == "gpt2" and g.train.batch_size * g.train.gradient_accumulation_steps == 480
    # llama2.c's TinyStories model and its train.py schedule: 128 x 4 x 256 = 131,072 tokens per step
    s = load_config("tinystories")
    assert (s.model.n_layer, s.model.n_head, s.model.n_embd, s.model.block_size) == (6, 6, 288, 256)
    assert (s.data.source, s.data.tokenizer, s.train.device) == ("hf:roneneldan/TinyStories", "gpt2", "cuda")
    t = s.train
    assert t.batch_size * t.gradient_accumulation_steps * s.model.block_size == 128 * 4 * 256
    assert (t.learning_rate, t.min_lr, t.warmup_iters, t.max_iters, t.lr_decay_iters) == (5e-4, 0.0, 1000, 100000,
                                                                                        100000)
    assert (t.beta1, t.beta2, t.weight_decay, t.grad_clip, s.model.dropout) == (0.9, 0.95, 0.1, 1.0, 0.0)


def test_user_toml_file_and_tool_sections(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('[model]\nn_layer = 2\n[train]\nlearning_rate = 3e-4\nmax_iters = 7\n[study]\nseeds = 3\n')
    cfg = load_config(str(p))
    assert (cfg.model.n_layer, cfg.train.learning_rate, cfg.train.max_iters) == (2, 3e-4, 7)
    assert cfg.model.n_embd == RunConfig().model.n_embd  # untouched fields keep the dataclass default
    assert read_toml(str(p))["study"] == {"seeds": 3}
    assert preset_text(str(p)).startswith("[model]")


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[model]\nn_layers = 2\n", "model.n_layers"),  # unknown key
        ("[trian]\nmax_iters = 2\n", "[trian]"),  # unknown section
        ('[train]\nmax_iters = "many"\n', "train.max_iters"),  # wrong type
        ("[train]\nlearning_rate = true\n", "train.learning_rate"),  # bool is not a float
        ("[model]\ndropout = 1\n", "model.dropout"),  # out of range (int coerced to float, then checked)
        ("[train]\nbatch_size = 0\n", "train.batch_size"),
        ("[train]\nmax_iters = -5\n", "train.max_iters"),
        ("[train\nmax_iters = 2\n", "not valid TOML"),
        ("max_iters = 3\n", "must be inside a table"),
    ],
)
def test_bad_toml_names_the_key(tmp_path, toml, needle):
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"train.max_iter": "5"}, "train.max_iter"),
        ({"optim.lr": "5"}, "optim"),
        ({"max_iters": "5"}, "needs a section"),
        ({"train.max_iters": "five"}, "train.max_iters expects int"),
        ({"train.compile": "maybe"}, "train.compile expects bool"),
        ({"train.learning_rate": "nan"}, "finite"),
        ({"model.attention": "softmax2"}, "softmax2"),
        ({"train.device": "tpu"}, "tpu"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("default", override)
    assert needle in str(e.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.toml")


def test_override_precedence(tmp_path):
    # defaults < preset < --set < dedicated flags; parse_assignments keeps values as strings until typed
    assert parse_assignments(["train.max_iters=12", "model.attention=softmax1"]) == {
        "train.max_iters": "12", "model.attention": "softmax1"}
    with pytest.raises(ConfigError):
        parse_assignments(["train.max_iters"])
    base = load_config("shakespeare-char-cpu")
    cfg = load_config("shakespeare-char-cpu", {"train.max_iters": "12", "model.n_layer": 3})
    assert (cfg.train.max_iters, cfg.model.n_layer, cfg.model.n_embd) == (12, 3, base.model.n_embd)
    # through the CLI's own flag handling: --max-iters wins over --set train.max_iters
    from quietgpt.cli import _overrides, build_parser

    args = build_parser().parse_args(["train", "--preset", "default", "--set", "train.max_iters=3",
                                      "--max-iters", "9", "--set", "train.seed=5", "--out", str(tmp_path)])
    ov = _overrides(args)
    cfg = load_config("default", ov)
    assert (cfg.train.max_iters, cfg.train.seed, cfg.train.out_dir) == (9, 5, str(tmp_path))
    # apply_overrides returns a new config and re-validates it
    again = apply_overrides(cfg, {"train": {"batch_size": 3}})
    assert again.train.batch_size == 3
    assert cfg.train.batch_size == load_config("default").train.batch_size != 3


def test_to_dict_round_trip():
    cfg = load_config("shakespeare-char", {"model.attention": "softmax1"})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_cli(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    training = lines[1:lines.index(next(ln for ln in lines if ln.startswith("study presets")))]
    assert [ln.split()[0] for ln in training] == preset_names()
    assert all(len(ln.split()) > 3 for ln in training)  # each with its one-line description
    assert main(["presets", "shakespeare-char-cpu"]) == 0
    out = capsys.readouterr().out
    assert "[model]" in out and "n_embd = 128" in out
    assert main(["presets", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset" in err and len(err.strip().splitlines()) == 1


def test_lr_schedule_against_hand_computed_cosine():
    cfg = load_config("default", {"train.learning_rate": 1e-3, "train.min_lr": 1e-4, "train.warmup_iters": 10,
                                  "train.lr_decay_iters": 110})
    tc = cfg.train
    # warmup: lr * (it + 1) / (warmup + 1), as nanoGPT
    assert get_lr(0, tc) == pytest.approx(1e-3 * 1 / 11)
    assert get_lr(9, tc) == pytest.approx(1e-3 * 10 / 11)
    # at the end of warmup the cosine starts at its top
    assert get_lr(10, tc) == pytest.approx(1e-3)
    # halfway through the decay: cos(pi/2) = 0 -> the midpoint of lr and min_lr
    assert get_lr(60, tc) == pytest.approx(5.5e-4)
    # a quarter: min + 0.5 (1 + cos(pi/4)) (lr - min) = 1e-4 + 0.853553 * 9e-4
    assert get_lr(35, tc) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert get_lr(110, tc) == pytest.approx(1e-4)
    assert get_lr(500, tc) == 1e-4
    flat = apply_overrides(cfg, {"train.decay_lr": False})
    assert get_lr(0, flat.train) == get_lr(99, flat.train) == 1e-3
    odd = apply_overrides(cfg, {"train.lr_decay_iters": 5})  # decay ends inside warmup: min_lr afterwards
    assert get_lr(3, odd.train) == pytest.approx(1e-3 * 4 / 11) and get_lr(10, odd.train) == 1e-4


def test_quiet_error_is_config_error_parent():
    assert issubclass(ConfigError, QuietError)
