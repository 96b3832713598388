"""Every row of docs/bad_inputs.md: exit code 2 (or a QuietError from the Python API), exactly one line
of message with no traceback, the message the doc shows, and every file already there untouched.

Regenerate the doc's table from real runs after changing a message:

    python tests/test_bad_inputs.py > docs/bad_inputs.md
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from quietgpt import cli
from quietgpt.errors import QuietError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad_inputs.md"
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.batch_size=4",
        "train.eval_iters=2", "train.max_iters=4", "train.lr_decay_iters=4", "train.eval_interval=2",
        "train.warmup_iters=1", "train.threads=1", "data.synthetic_tokens=20000"]


def S(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


# id -> (what, argv with {w} = the world folder); CLI rows
CLI_ROWS: dict[str, tuple[str, list[str]]] = {
    "unknown-preset": ("preset name that does not exist", ["train", "--preset", "nosuch"]),
    "missing-toml": ("config file that does not exist", ["train", "--preset", "{w}/missing.toml"]),
    "bad-toml": ("config file that is not valid TOML", ["train", "--preset", "{w}/bad.toml"]),
    "unknown-section": ("TOML with an unknown table", ["train", "--preset", "{w}/section.toml"]),
    "unknown-key": ("misspelt config key", ["train", *S("model.n_layr=2")]),
    "optimizer-unknown": ("unknown optimizer", ["train", *S("train.optimizer=sgd")]),
    "optimizer-option": ("an option of another optimizer", ["train", *S("train.muon_lr=0.01")]),
    "no-section": ("config key without a section", ["train", *S("n_layer=2")]),
    "bad-assignment": ("--set without '='", ["train", *S("model.n_layer")]),
    "wrong-type": ("value of the wrong type", ["train", *S("model.n_layer=two")]),
    "wrong-bool": ("boolean that is not one", ["train", *S("model.bias=maybe")]),
    "nan-value": ("non-finite number", ["train", *S("train.learning_rate=nan")]),
    "zero-iters": ("non-positive iterations", ["train", "--max-iters", "0"]),
    "negative-batch": ("non-positive batch size", ["train", *S("train.batch_size=-1")]),
    "val-fraction": ("value out of range", ["train", *S("data.val_fraction=1.5")]),
    "heads-divide": ("n_embd not divisible by n_head", ["train", *S("model.n_embd=30", "model.n_head=4")]),
    "unknown-tokenizer": ("unknown tokenizer", ["prepare", *S("data.tokenizer=bpe")]),
    "unknown-variant": ("unknown attention variant", ["train", "--attention", "softmax2"]),
    "unknown-gate-mode": ("unknown output-gate mode",
                          ["train", "--attention", "outgate", *S("model.gate_mode=rowwise")]),
    "option-of-other-variant": ("an option that belongs to another attention variant",
                                ["train", "--attention", "sigmoid", *S("model.gate_mode=headwise")]),
    "unknown-nonfinite": ("unknown non-finite policy", ["train", *S("train.nonfinite=ignore")]),
    "outlier-quant": ("unknown quant config for the trajectories", ["train", *S("train.outlier_quant=w8a8,int4")]),
    "unknown-device": ("unknown device", ["train", "--device", "tpu"]),
    "cuda-unavailable": ("CUDA asked for on a machine without it",
                         ["train", "--out", "{w}/new", "--device", "cuda", *S("data.cache_dir={w}/cache", *TINY)]),
    "missing-data": ("data file that does not exist",
                     ["train", "--out", "{w}/new", "--data", "{w}/missing.txt", *S("data.cache_dir={w}/cache")]),
    "out-is-a-file": ("output folder that cannot be created (a file is in the way)",
                      ["train", "--out", "{w}/afile", *S("data.cache_dir={w}/cache", *TINY)]),
    "out-has-checkpoint": ("output folder that already holds a run, without --resume",
                           ["train", "--out", "{w}/run", *S("data.cache_dir={w}/cache", *TINY)]),
    "resume-nothing": ("--resume on a folder with no checkpoint", ["train", "--resume", "--out", "{w}/empty"]),
    "resume-other-arch": ("--resume with another architecture",
                          ["train", "--resume", "--out", "{w}/run", *S("model.n_layer=2")]),
    "resume-other-vocab": ("--resume on data with another vocabulary",
                           ["train", "--resume", "--out", "{w}/run", "--data", "{w}/other.txt",
                            *S("data.tokenizer=char")]),
    "resume-truncated": ("--resume from a truncated train_state.pt", ["train", "--resume", "--out", "{w}/trunc"]),
    "sample-missing": ("checkpoint folder that does not exist", ["sample", "--checkpoint", "{w}/missing"]),
    "sample-not-checkpoint": ("folder that is not a checkpoint", ["sample", "--checkpoint", "{w}/empty"]),
    "sample-truncated": ("truncated model.safetensors", ["sample", "--checkpoint", "{w}/trunc"]),
    "sample-other-arch": ("weights of another architecture than config.json",
                          ["sample", "--checkpoint", "{w}/otherarch"]),
    "sample-temperature": ("negative temperature", ["sample", "--checkpoint", "{w}/run", "--temperature", "-1"]),
    "eval-unknown-quant": ("unknown quantization config",
                           ["eval", "--checkpoint", "{w}/run", "--quant", "w3a99", "--json", "{w}/e.json"]),
    "eval-other-vocab": ("evaluating on data with another vocabulary",
                         ["eval", "--checkpoint", "{w}/run", "--data", "{w}/other.txt", "--json", "{w}/e.json"]),
    "eval-no-source": ("neither --checkpoint nor --hf", ["eval", "--json", "{w}/e.json"]),
    "study-unknown-variant": ("unknown study variant", ["study", "--out", "{w}/s2", "--variants", "softmax,nosuch"]),
    "study-path-variant": ("variant name that is a path", ["study", "--out", "{w}/s2", "--variants", "../../x"]),
    "study-seeds": ("non-positive number of seeds", ["study", "--out", "{w}/s2", "--seeds", "0"]),
    "study-jobs": ("non-positive number of jobs", ["study", "--out", "{w}/s2", "--jobs", "0"]),
    "study-preset": ("unknown study preset", ["study", "--out", "{w}/s2", "--preset", "nosuch"]),
    "study-per-run-key": ("overriding what the study sets per run", ["study", "--out", "{w}/s2", *S("train.seed=3")]),
    "study-no-baseline": ("variants without the baseline", ["study", "--out", "{w}/s2", "--variants", "softmax1,sink"]),
    "study-bad-baseline": ("--baseline not among the variants", ["study", "--out", "{w}/s2", "--baseline", "gated"]),
    "study-toml-key": ("a typo in a study file's [study] table", ["study", "--out", "{w}/s2", "--preset",
                                                                  "{w}/study.toml"]),
    "study-changed-config": ("study folder that holds a study with another config",
                             ["study", "--out", "{w}/study", "--variants", "softmax,softmax1", "--seeds", "1",
                              "--quant", "w8a8", *S("data.cache_dir={w}/cache", *TINY)]),
    "report-no-study": ("report on a folder with no study", ["report", "{w}/empty"]),
    "no-section-unknown": ("config key without a section that no section has", ["train", *S("n_layr=2")]),
    "set-hidden-by-flag": ("bad --set value that a flag replaces", ["train", "--max-iters", "5",
                                                                   *S("train.max_iters=abc")]),
    "export-missing": ("export of a checkpoint folder that does not exist",
                       ["export", "--checkpoint", "{w}/missing", "--hf", "{w}/exported"]),
    "export-out-not-empty": ("export into a folder that is not empty, without --force",
                             ["export", "--checkpoint", "{w}/run", "--hf", "{w}/study"]),
    "export-force-not-model": ("export --force into a folder that holds no model",
                               ["export", "--checkpoint", "{w}/run", "--hf", "{w}/study", "--force"]),
    "export-into-checkpoint": ("export --force over the checkpoint itself",
                               ["export", "--checkpoint", "{w}/run", "--hf", "{w}/run", "--force"]),
    "export-unknown-dtype": ("export with an unknown --dtype",
                             ["export", "--checkpoint", "{w}/run", "--hf", "{w}/exported", "--dtype", "int8"]),
    "init-not-hf": ("--init that is not hf:NAME_OR_PATH", ["train", "--init", "gpt2"]),
    "init-missing-folder": ("--init folder that does not exist",
                            ["train", "--init", "hf:{w}/missing", "--out", "{w}/new", *S("data.cache_dir={w}/cache")]),
    "init-not-gpt2": ("--init model of another architecture (Llama)",
                      ["train", "--init", "hf:{w}/hf-llama", "--out", "{w}/new", *S("data.cache_dir={w}/cache")]),
    "init-vocab": ("--init model whose vocabulary is smaller than the data's tokenizer",
                   ["train", "--init", "hf:{w}/hf-small-vocab", "--out", "{w}/new", "--data", "{w}/other.txt",
                    *S("data.tokenizer=byte", "data.cache_dir={w}/cache", *TINY)]),
    "init-resume-other": ("--resume with another --init than the checkpoint started from",
                          ["train", "--resume", "--out", "{w}/run", "--init", "hf:{w}/hf-small-vocab"]),
    **{f"eval-hf-{name}": (what, ["eval", "--hf", f"{{w}}/hf-{name}", "--data", "{w}/other.txt", "--tokenizer", "byte",
                                  "--cache-dir", "{w}/cache", "--json", "{w}/e.json"])
       for name, what in {
           "llama": "--hf folder of another architecture (Llama)",
           "other-head": "--hf folder of a GPT-2 with another head",
           "relu": "--hf GPT-2 with a non-GELU activation",
           "unscaled": "--hf GPT-2 with scale_attn_weights=False",
           "layer-scaled": "--hf GPT-2 with scale_attn_by_inverse_layer_idx=True",
           "cross-attention": "--hf GPT-2 with cross-attention",
           "eps": "--hf GPT-2 with another layer_norm_epsilon",
           "n-inner": "--hf GPT-2 with another MLP width (n_inner)",
           "untied": "--hf GPT-2 whose lm_head differs from wte",
           "missing-weights": "--hf folder whose weights lack a tensor",
           "extra-weights": "--hf folder whose weights hold an extra tensor",
           "small-vocab": "--hf model whose vocabulary is smaller than --tokenizer's",
       }.items()},
}
HF_MODELS = {  # folder name -> GPT2Config fields (see make_world)
    "other-head": {}, "relu": {"activation_function": "relu"}, "unscaled": {"scale_attn_weights": False},
    "layer-scaled": {"scale_attn_by_inverse_layer_idx": True}, "cross-attention": {"add_cross_attention": True},
    "eps": {"layer_norm_epsilon": 1e-6}, "n-inner": {"n_inner": 48}, "untied": {"tie_word_embeddings": False},
    "missing-weights": {}, "extra-weights": {}, "small-vocab": {},
}


def _api_rows():
    from quietgpt import config, study
    from quietgpt.measurement import evaluate
    from quietgpt.runs import checkpoint
    from quietgpt.training import loop

    return {
        "api-load-model": ("runs.checkpoint.load_model on a missing folder",
                           lambda w: checkpoint.load_model(w / "missing")),
        "api-from-dict": ("RunConfig.from_dict with a wrong type",
                          lambda w: config.RunConfig.from_dict({"model": {"n_layer": "x"}})),
        "api-load-config": ("config.load_config with an unknown preset", lambda w: config.load_config("nosuch")),
        "api-evaluate-quant": ("measurement.evaluate.evaluate_checkpoint with an unknown quant config",
                               lambda w: evaluate.evaluate_checkpoint(w / "run", quant=["int3"])),
        "api-train-state": ("runs.checkpoint.load_train_state on a truncated file",
                            lambda w: checkpoint.load_train_state(w / "trunc")),
        "api-train-device": ("training.loop.train on a device that is not there",
                             lambda w: loop.train(config.load_config("default", {
                                 "train.device": "cuda:0", "train.out_dir": str(w / "new")}))),
        "api-study-variant": ("study.run_study with a path as a variant",
                              lambda w: study.run_study(w / "s2", variants=["softmax", "../x"])),
        "api-int8-cuda": ("measurement.evaluate.measure with int8-dynamic on a CUDA device", lambda w: evaluate.measure(
            *_model_and_data(w / "run"), quant=["w8a8", "int8-dynamic"], device="cuda")),
    }


def _model_and_data(run: Path):
    """The trained run's model and its prepared data (for API rows that measure)."""
    from quietgpt.data import sources as data
    from quietgpt.runs import checkpoint

    model, cfg = checkpoint.load_model(run)
    return model, data.prepare(cfg.data)


# ----------------------------------------------------------------------------- the world the rows run in


def make_world(w: Path) -> Path:
    """A folder with a trained tiny run, damaged copies of it, a small study's study.json, and bad files."""
    from quietgpt.config import load_config, parse_assignments
    from quietgpt.study.spec import resolve_spec
    from quietgpt.training.loop import train

    w.mkdir(parents=True, exist_ok=True)
    cache = w / "cache"
    n = torch.get_num_threads()
    from quietgpt.data.sources import prepare

    # prepared first, so that train reads the meta back from meta.json (see test_faults.py's test of a
    # fresh in-process prepare, whose numpy scalars made train_state.pt unloadable)
    prepare(load_config("default", {**parse_assignments(TINY), "data.cache_dir": str(cache)}).data)
    train(load_config("default", {**parse_assignments(TINY), "data.cache_dir": str(cache),
                                  "train.out_dir": str(w / "run")}), progress=False)
    torch.set_num_threads(n)
    (w / "bad.toml").write_text("[model]\nn_layer = \n")
    (w / "section.toml").write_text("[modle]\nn_layer = 2\n")
    (w / "study.toml").write_text("[study]\nseedz = 2\n")
    (w / "empty").mkdir()
    (w / "afile").write_text("not a folder\n")
    (w / "other.txt").write_text("completely different text: 0123456789 @#$%^&*" * 200)
    shutil.copytree(w / "run", w / "trunc")
    for name in ("train_state.pt", "model.safetensors"):
        data = (w / "trunc" / name).read_bytes()
        (w / "trunc" / name).write_bytes(data[: len(data) // 2])
    shutil.copytree(w / "run", w / "otherarch")
    doc = json.loads((w / "otherarch" / "config.json").read_text())
    doc["model"]["n_layer"] = 2
    (w / "otherarch" / "config.json").write_text(json.dumps(doc))
    spec = resolve_spec("default", variants=["softmax", "sink"], seeds=1, quant=["w8a8"],
                        overrides={**parse_assignments(TINY), "data.cache_dir": str(cache)})
    (w / "study").mkdir()
    (w / "study" / "study.json").write_text(json.dumps(spec.to_dict()))
    if importlib.util.find_spec("transformers") is not None:
        make_hf_models(w)
    return w


def make_hf_models(w: Path) -> None:
    """Tiny saved Hugging Face models that `eval --hf` must refuse (HF_MODELS, and a Llama)."""
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32)).save_pretrained(str(w / "hf-llama"))
    for name, fields in HF_MODELS.items():
        cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, **fields)
        cls = transformers.GPT2DoubleHeadsModel if name == "other-head" else transformers.GPT2LMHeadModel
        cls(cfg).save_pretrained(str(w / f"hf-{name}"))
    for name, edit in (("missing-weights", lambda sd: sd.pop("transformer.h.0.mlp.c_fc.weight")),
                       ("extra-weights", lambda sd: sd.update({"transformer.h.0.attn.rotary.weight": torch.ones(4)}))):
        path = w / f"hf-{name}" / "model.safetensors"
        sd = load_file(str(path))
        edit(sd)
        save_file(sd, str(path), metadata={"format": "pt"})
    hf_logging.enable_progress_bar()


def tree_hash(w: Path) -> dict:
    return {str(p.relative_to(w)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(w.rglob("*")) if p.is_file() and "cache" not in p.relative_to(w).parts}


def run_cli(w: Path, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([a.replace("{w}", str(w)) for a in argv])
    return code, err.getvalue()


def run_api(w: Path, fn) -> tuple[int, str]:
    try:
        fn(w)
    except QuietError as e:
        return 2, str(e)
    return 0, ""


def normalise(msg: str, w: Path) -> str:
    return msg.strip().replace(str(w.resolve()), "<tmp>").replace(str(w), "<tmp>")


def doc_messages() -> dict[str, str]:
    out = {}
    if DOC.is_file():
        for line in DOC.read_text(encoding="utf-8").splitlines():
            cells = [c.strip() for c in line.split(" | ")]
            if line.startswith("| `") and len(cells) >= 4:
                msg = cells[-1].rstrip("|").strip()
                out[cells[0].strip("| `")] = msg.removeprefix("`` ").removesuffix(" ``").replace("\\|", "|")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def documented() -> dict[str, str]:
    return doc_messages()


def _check(world: Path, documented: dict, rid: str, code: int, err: str, before: dict) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert tree_hash(world) == before, "a bad input changed files already there"
    assert rid in documented, f"row {rid} missing from {DOC}; regenerate it (see this file's docstring)"
    assert normalise(lines[0], world) == documented[rid]


@pytest.mark.parametrize("rid", list(CLI_ROWS))
def test_cli_row(world, documented, rid):
    if rid.startswith(("eval-hf-", "init-")):
        pytest.importorskip("transformers")
    before = tree_hash(world)
    code, err = run_cli(world, CLI_ROWS[rid][1])
    _check(world, documented, rid, code, err, before)
    assert err.startswith(f"quietgpt {CLI_ROWS[rid][1][0]}: error: ")


@pytest.mark.parametrize("rid", list(_api_rows()))
def test_api_row(world, documented, rid):
    before = tree_hash(world)
    code, err = run_api(world, _api_rows()[rid][1])
    _check(world, documented, rid, code, err, before)


@pytest.mark.slow
@pytest.mark.parametrize("rid", ["bad-toml", "sample-truncated", "resume-other-arch", "study-path-variant"])
def test_cli_row_in_a_real_process(world, documented, rid):
    before = tree_hash(world)
    argv = [a.replace("{w}", str(world)) for a in CLI_ROWS[rid][1]]
    p = subprocess.run([sys.executable, "-m", "quietgpt", *argv], capture_output=True, text=True, timeout=300)
    _check(world, documented, rid, p.returncode, p.stderr, before)
    assert p.stdout == ""


def test_doc_has_enough_rows_and_no_stale_ones(documented):
    ids = set(CLI_ROWS) | set(_api_rows())
    assert len(ids) >= 25
    assert set(documented) == ids


def main() -> None:
    """Print docs/bad_inputs.md, each message taken from a real run."""
    with tempfile.TemporaryDirectory() as tmp:
        w = make_world(Path(tmp) / "w")
        print("# Bad inputs and the messages they get\n")
        print("Every row is run by `tests/test_bad_inputs.py`: exit code 2 (the CLI) or a `QuietError` (the "
              "Python API), exactly one line of message with no traceback, and every file already in the "
              "folder (a trained run, damaged copies of it, a study) byte-for-byte untouched. `<tmp>` stands "
              "for the test's folder. Regenerate with `python tests/test_bad_inputs.py > docs/bad_inputs.md`."
              "\n")
        print("| id | bad input | command or call | message |")
        print("|---|---|---|---|")
        rows = [(rid, what, "quietgpt " + " ".join(argv), run_cli(w, argv)) for rid, (what, argv) in CLI_ROWS.items()]
        rows += [(rid, what, what.split(" ")[0], run_api(w, fn)) for rid, (what, fn) in _api_rows().items()]
        for rid, what, call, (code, err) in rows:
            msg = normalise(err, w).replace("|", "\\|")
            call = call.replace("{w}", "<tmp>").replace("|", "\\|")
            print(f"| `{rid}` | {what} | `` {call} `` | `` {msg} `` |")
            if code != 2:
                print(f"row {rid}: exit code {code}", file=sys.stderr)


if __name__ == "__main__":
    main()
