"""The study spec: study presets as TOML, a user's own study file, [study] keys, the baseline, study.json."""

from __future__ import annotations

import pytest

from quietgpt.cli import main
from quietgpt.config import StudyConfig, load_config
from quietgpt.errors import ConfigError
from quietgpt.nn.variants import VARIANTS
from quietgpt.presets import study_preset_names
from quietgpt.study.spec import StudySpec, resolve_spec


def test_shipped_study_presets_resolve_and_default_is_the_readme_study():
    assert {"default", "full", "shakespeare-char-cpu", "shakespeare-char", "gpt2-small", "tinystories"} <= set(
        study_preset_names())
    for name in study_preset_names():
        spec = resolve_spec(name)
        assert spec.baseline in spec.variants and spec.description
    d = resolve_spec("default")
    assert (d.variants, d.seeds, d.baseline) == (("softmax", "softmax1", "sink"), (0, 1, 2), "softmax")
    assert (d.quant, d.n_sequences, d.calib_batches, d.eval_tokens) == (("w8a8", "w6a8", "w4a8"), 32, 8, 32768)
    t = d.run.train
    assert (t.max_iters, t.lr_decay_iters, t.warmup_iters, t.eval_interval, t.eval_iters) == (250, 250, 25, 125, 10)
    assert d.run.model == load_config("default").model  # everything else is the training preset's
    assert resolve_spec("full").variants == VARIANTS
    assert resolve_spec("shakespeare-char-cpu").eval_tokens is None  # the whole validation split


def test_a_users_study_file(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('[study]\ndescription = "two seeds"\nbase = "shakespeare-char-cpu"\nvariants = ["softmax", '
                 '"gated"]\nseeds = 2\nquant = ["w4a8"]\n[model]\nn_layer = 2\n[train]\nmax_iters = 30\n')
    spec = resolve_spec(str(p), overrides={"train.learning_rate": "3e-4"})
    assert (spec.variants, spec.seeds, spec.quant, spec.description) == (("softmax", "gated"), (0, 1), ("w4a8",),
                                                                        "two seeds")
    assert (spec.run.model.n_layer, spec.run.model.n_embd) == (2, 128)  # file over base preset
    assert (spec.run.train.max_iters, spec.run.train.learning_rate) == (30, 3e-4)  # command line last
    assert spec.overrides["model.n_layer"] == "2" and spec.train_preset == "shakespeare-char-cpu"
    # the command line's choices win over the file's
    assert resolve_spec(str(p), seeds=1, variants=["gated", "softmax"]).seeds == (0,)
    # a plain run-config file is a study of that config with the default study settings
    q = tmp_path / "run.toml"
    q.write_text("[model]\nn_layer = 3\n")
    s2 = resolve_spec(str(q))
    assert s2.run.model.n_layer == 3 and s2.variants == StudyConfig().variants


@pytest.mark.parametrize("toml, needle", [
    ("[study]\nseedz = 5\n", "study.seedz (did you mean study.seeds?)"),
    ("[study]\nseeds = \"five\"\n", "study.seeds expects int"),
    ("[study]\nvariants = [\"softmax1\", \"sink\"]\n", "baseline 'softmax' is not among the variants"),
    ("[study]\nvariants = [\"softmax\", \"softmax\"]\n", "distinct"),
    ("[study]\nvariants = [\"softmax\", \"nope\"]\n", "unknown attention variant or recipe 'nope'"),
    ("[study]\n[train]\nseed = 3\n", "train.seed is set per run"),
    ("[study]\n[trian]\nmax_iters = 3\n", "unknown section [trian]"),
])
def test_bad_study_files_are_one_line_errors(tmp_path, toml, needle, capsys):
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as e:
        resolve_spec(str(p))
    assert needle in str(e.value)
    assert main(["study", "--preset", str(p), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "s").exists()


def test_a_typo_in_study_is_an_error_for_train_too(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("[study]\nbaselin = \"softmax\"\n[model]\nn_layer = 1\n")
    with pytest.raises(ConfigError, match=r"study\.baselin"):
        load_config(str(p))


def test_baseline_option_and_missing_baseline(tmp_path, capsys):
    spec = resolve_spec("default", variants=["softmax1", "sink"], baseline="softmax1")
    assert spec.baseline == "softmax1"
    assert main(["study", "--out", str(tmp_path / "s"), "--variants", "softmax1,sink"]) == 2
    err = capsys.readouterr().err
    assert "baseline 'softmax' is not among the variants" in err and "--baseline" in err


def test_spec_round_trips_through_study_json():
    spec = resolve_spec("default", variants=["softmax", "clipped"], seeds=2, overrides={"model.n_layer": "1"})
    d = spec.to_dict()
    assert d["run"]["train"]["out_dir"] == "" and d["baseline"] == "softmax"
    again = StudySpec.from_dict(d)
    assert again.to_dict() == d
    assert again.run_config("clipped", 1, "x").train.seed == 1
    assert again.run_config("clipped", 1, "x").model.attention == "clipped"
    with pytest.raises(ConfigError, match="not a study config"):
        StudySpec.from_dict({"variants": ["softmax"]})


def test_presets_lists_training_and_study_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "training presets" in out and "study presets" in out
    assert "full" in out and "all 11 attention variants" in out  # the study-only preset, with its description
    assert out.count("wall time: ") == len(study_preset_names())  # and every study preset's estimate
    assert main(["presets", "full"]) == 0
    assert "[study]" in capsys.readouterr().out
    assert main(["presets", "default", "--kind", "study"]) == 0
    assert "[study]" in capsys.readouterr().out
    assert main(["presets", "default"]) == 0
    assert "[study]" not in capsys.readouterr().out  # the training preset of that name


def test_crossing_variants_with_optimizers():
    spec = resolve_spec("default", variants=["softmax", "softmax1"], optimizers=["adamw", "muon"], seeds=2)
    assert spec.arms == ("softmax+adamw", "softmax1+adamw", "softmax+muon", "softmax1+muon")
    assert spec.baseline_arm == "softmax+adamw" and spec.arm_parts("softmax1+muon") == ("softmax1", "muon")
    cfg = spec.run_config("softmax1+muon", 1, "x")
    assert (cfg.model.attention, cfg.train.optimizer, cfg.train.seed) == ("softmax1", "muon", 1)
    d = spec.to_dict()
    assert d["arms"] == list(spec.arms) and StudySpec.from_dict(d).arms == spec.arms
    plain = resolve_spec("default", variants=["softmax", "softmax1"])
    assert plain.arms == plain.variants and plain.baseline_arm == "softmax"
    assert plain.run_config("softmax1", 0, "x").train.optimizer == "adamw"
    with pytest.raises(ConfigError, match=r"study\.optimizers must name distinct optimizers"):
        resolve_spec("default", optimizers=["adamw", "nosuch"])
    with pytest.raises(ConfigError, match=r"train\.optimizer is set per run"):
        resolve_spec("default", optimizers=["adamw", "muon"], overrides={"train.optimizer": "muon"})


def test_settings_added_since_a_study_was_made_do_not_make_it_another_config():
    """A study.json / result.json written before a setting existed lacks it: at its default it is the same
    config (the study resumes), changed it is not."""
    from quietgpt.study.run import run_config_record
    from quietgpt.study.spec import differences, same_record

    spec = resolve_spec("default", variants=["softmax", "sink"], seeds=1)
    new = spec.to_dict()
    old = {k: v for k, v in new.items() if k not in ("optimizers", "arms", "baseline_arm")}
    old["run"] = {sec: {k: v for k, v in t.items() if k not in ("cuda_kernel", "optimizer", "init")}
                  for sec, t in new["run"].items()}
    assert differences(old, new) == []
    changed = resolve_spec("default", variants=["softmax", "sink"], seeds=1, overrides={"model.cuda_kernel": "flash"})
    assert differences(old, changed.to_dict()) == ["run.model.cuda_kernel"]
    rec = run_config_record(spec, "sink", 0)
    old_rec = {"run": {sec: {k: v for k, v in t.items() if k != "optimizer"} for sec, t in rec["run"].items()},
               "measure": rec["measure"]}
    assert same_record(old_rec, rec) and not same_record(None, rec)
    assert not same_record(old_rec, run_config_record(changed, "sink", 0))


def test_an_option_of_one_variant_goes_to_that_variants_runs_only(tmp_path):
    spec = resolve_spec("default", variants=["softmax", "outgate", "softmax_n"], seeds=1,
                        overrides={"model.gate_mode": "headwise", "model.softmax_n": "2"})
    cfgs = {v: spec.run_config(v, 0, "x").model for v in spec.variants}
    assert (cfgs["outgate"].gate_mode, cfgs["softmax_n"].softmax_n) == ("headwise", 2.0)
    assert (cfgs["softmax"].gate_mode, cfgs["softmax"].softmax_n) == ("elementwise", 1.0)  # defaults elsewhere
    assert StudySpec.from_dict(spec.to_dict()).run_config("outgate", 0, "x").model.gate_mode == "headwise"
    p = tmp_path / "s.toml"
    p.write_text('[study]\nvariants = ["softmax", "sigmoid"]\n[model]\nsigmoid_bias = "-3"\n')
    assert resolve_spec(str(p)).run_config("sigmoid", 0, "x").model.sigmoid_bias == "-3"
    with pytest.raises(ConfigError, match=r"model\.gate_mode is an option of attention variant outgate"):
        resolve_spec("default", overrides={"model.gate_mode": "headwise"})
