"""Safe loading, no shell or eval, no writes outside the output folder, an escaped HTML report.

A checkpoint downloaded from somewhere must not be able to run code: everything quietgpt reads from disk
goes through safetensors, JSON, numpy without pickles, or torch.load(weights_only=True). The malicious
files below would create a marker file if unpickled; every verb that could read them must leave no marker.
"""

import ast
import hashlib
import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from quietgpt import cli
from quietgpt.config import load_config
from quietgpt.training.loop import train

SRC = Path(__file__).resolve().parents[1] / "src" / "quietgpt"
EVIL = "<script>alert(1)</script>"



class Pwn:
    """Unpickling this creates the file at `path` (open(path, "w"))."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


TINY = {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 32, "train.batch_size": 4,
        "train.eval_iters": 2, "train.max_iters": 4, "train.lr_decay_iters": 4, "train.eval_interval": 2,
        "train.warmup_iters": 1, "train.threads": 1, "data.synthetic_tokens": 20000}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def run(tmp_path, cache) -> Path:
    out = tmp_path / "run"
    train(load_config("default", {**TINY, "data.cache_dir": str(cache), "train.out_dir": str(out)}), progress=False)
    return out


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_line_error(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("error:") == 1, err
    line = err.splitlines()[-1]
    assert line.startswith(f"quietgpt {verb}: error: ")
    return line


def test_malicious_train_state_never_runs(run, tmp_path, capsys):
    """A train_state.pt whose pickle opens a file: --resume refuses in one line (exit 2) and the file is
    never created; sample and eval never read train_state.pt at all (they still work, marker absent)."""
    marker = tmp_path / "pwned"
    state = torch.load(run / "train_state.pt", weights_only=False)  # our own file (may hold numpy scalars)
    state["rng"]["evil"] = Pwn(str(marker))
    torch.save(state, run / "train_state.pt")
    before = digest(run)
    assert cli.main(["train", "--out", str(run), "--resume", "--max-iters", "8"]) == 2
    line = one_line_error(capsys, "train")
    assert "train_state.pt" in line and "unsafe" in line
    assert not marker.exists()
    assert digest(run) == before
    assert cli.main(["sample", "--checkpoint", str(run), "--max-new-tokens", "3"]) == 0
    assert cli.main(["eval", "--checkpoint", str(run), "--json", str(tmp_path / "e.json"), "--quant", "",
                     "--n-sequences", "2", "--calib-batches", "1"]) == 0
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused(run, tmp_path, capsys):
    """model.safetensors replaced by a torch pickle (what an old .pt checkpoint renamed would be)."""
    marker = tmp_path / "pwned"
    torch.save({"w": Pwn(str(marker))}, run / "model.safetensors")
    for argv in (["sample", "--checkpoint", str(run), "--max-new-tokens", "3"],
                 ["eval", "--checkpoint", str(run), "--json", str(tmp_path / "e.json"), "--quant", ""]):
        assert cli.main(argv) == 2
        line = one_line_error(capsys, argv[0])
        assert "model.safetensors" in line
    assert not marker.exists() and not (tmp_path / "e.json").exists()


def test_pickled_numpy_attention_sample_is_not_unpickled(tmp_path):
    """The report's own loader (report._run_data) reads attn_sample.npz: an object array in it (a pickle)
    must not be unpickled, and the run's sample is then simply missing; a plain array still loads."""
    from quietgpt import report

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, np.array([Pwn(str(marker))], dtype=object), allow_pickle=True)
    for name in ("evil", "good"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "runs" / "evil" / "attn_sample.npz", "w") as z:
        z.writestr("probs.npy", buf.getvalue())
    np.savez(tmp_path / "runs" / "good" / "attn_sample.npz", probs=np.eye(3, dtype=np.float32))
    runs = [{"variant": "softmax", "seed": s, "status": "ok", "dir": f"runs/{name}"}
            for s, name in enumerate(("evil", "good"))]
    evil, good = report._run_data(tmp_path, runs)
    assert evil["sample"] is None and not marker.exists()
    np.testing.assert_array_equal(good["sample"], np.eye(3))  # the loader does load plain arrays

def unsafe_calls(source: str) -> list[str]:
    """What in `source` (Python code) could run code from a file or a shell: shell=True, os.system/popen,
    eval/exec, pickle loads, allow_pickle=True, torch.load without weights_only=True. Comments and
    docstrings do not count."""
    code = _code_of(source)
    found = [word for word in ("shell=True", "os.system(", "os.popen(", "pickle.load", "allow_pickle=True")
             if word in code]
    found += [m.group(1) + "(" for m in re.finditer(r"(?<![\w.])(eval|exec)\(", code)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            kw = {k.arg: k.value for k in node.keywords}
            if getattr(kw.get("weights_only"), "value", None) is not True:
                found.append("torch.load without weights_only=True")
    return found


def _code_of(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
                and isinstance(node.value.value, str):
            node.value.value = ""
    return ast.unparse(tree)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_source_has_no_unsafe_calls(path):
    assert unsafe_calls(path.read_text(encoding="utf-8")) == [], path


@pytest.mark.parametrize("bad, found", [
    ("import subprocess\nsubprocess.run(c, shell=True)\n", "shell=True"),
    ("import os\nos.system('ls')\n", "os.system("),
    ("x = eval(s)\n", "eval("),
    ("import pickle\ny = pickle.load(f)\n", "pickle.load"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)\n", "allow_pickle=True"),
    ("import torch\nx = torch.load(p)\n", "torch.load without weights_only=True"),
    ("import torch\nx = torch.load(p, weights_only=False)\n", "torch.load without weights_only=True"),
])
def test_the_source_check_flags_each_unsafe_pattern(bad, found):
    """The check above runs the same function on planted code: each pattern is flagged, and the safe forms
    (a docstring that mentions eval(, torch.load with weights_only=True, model.eval()) are not."""
    assert found in unsafe_calls(bad)
    safe = '"""eval( and pickle.load in a docstring"""\nimport torch\nx = torch.load(p, weights_only=True)\nm.eval()\n'
    assert unsafe_calls(safe) == []


@pytest.mark.parametrize("variant", ["../../x", "softmax/../../x", "/tmp/x", "..", "soft max"])
def test_study_variant_names_cannot_escape_the_study_folder(tmp_path, variant, capsys):
    """Run folders are named after variants (runs/<variant>-s<seed>): a path-like name is refused before
    anything is written, inside or outside the study folder."""
    out = tmp_path / "a" / "study"
    assert cli.main(["study", "--out", str(out), "--variants", f"softmax,{variant}", "--seeds", "1"]) == 2
    line = one_line_error(capsys, "study")
    assert "unknown attention variant" in line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_config_strings_are_data_not_code(tmp_path, capsys):
    """A --set value that looks like Python is a type error, never evaluated."""
    marker = tmp_path / "pwned"
    expr = f"__import__('pathlib').Path('{marker}').touch() or 1"
    assert cli.main(["prepare", "--set", f"model.n_layer={expr}"]) == 2
    assert "model.n_layer expects int" in one_line_error(capsys, "prepare")
    assert not marker.exists()


@pytest.mark.slow
def test_html_report_escapes_a_script_tag_in_the_data_path(tmp_path, cache, capsys):
    """A real (tiny) study on a .txt file whose path contains <script>alert(1)</script>: report.html shows it
    as text (escaped), never as a tag; report.md and results.json keep the real path."""
    folder = tmp_path / "<script>alert(1)<"
    folder.mkdir()
    data = folder / "script>.txt"
    data.write_text(("To be, or not to be, that is the question.\n" * 400), encoding="utf-8")
    assert EVIL in str(data)
    out = tmp_path / "study"
    args = ["study", "--out", str(out), "--variants", "softmax,softmax1", "--seeds", "1", "--quant", "w8a8",
            "--data", str(data)]
    for k, v in {**TINY, "data.cache_dir": str(cache), "data.tokenizer": "char"}.items():
        args += ["--set", f"{k}={v}"]
    assert cli.main(args) == 0, capsys.readouterr().err
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["run"]["data"]["source"] == str(data)
    pickle.dumps(res)  # plain data
