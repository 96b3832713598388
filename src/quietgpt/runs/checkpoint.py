"""Checkpoints: a run folder that a killed process never leaves half-written or inconsistent.

A run folder holds
    model.safetensors   the weights (safetensors: no code runs on load); the tied lm_head.weight is not
                        stored (it is transformer.wte.weight), its metadata carries iter and step_id
    config.json         RunConfig.to_dict() + format version + "tokenizer"/"dataset" meta (what `sample`
                        and `eval` need to encode text), + the same iter/step_id
    train_state.pt      the resume point, self-contained: the weights again, optimizer, GradScaler,
                        iteration, best val loss, RNG and data-generator states, the run config.
                        Plain tensors and Python types only, so torch.load(weights_only=True) reads it.
    best/               model.safetensors + config.json of the best val loss so far

Every file is written atomically (quietgpt.utils.atomic: temp file, fsync, rename). train_state.pt is written
first and is all that --resume reads, so a crash between the three files leaves either the old or the
new resume point, never a mix of two steps (model.safetensors may then be one checkpoint behind
train_state.pt; both are internally consistent, and the next save brings them level again).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import torch

from quietgpt.config import SECTIONS, RunConfig
from quietgpt.errors import QuietError
from quietgpt.nn.model import GPT, GPTConfig
from quietgpt.utils.atomic import atomic_write, atomic_write_json
from quietgpt.utils.device import resolve_device

FORMAT_VERSION = 1
WEIGHTS, CONFIG, STATE, BEST = "model.safetensors", "config.json", "train_state.pt", "best"
TIED = {"lm_head.weight": "transformer.wte.weight"}  # stored once, under the value's name
# model settings that change the parameters' meaning or shapes: a resume must not change them
ARCH_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "attention", "softmax_n",
             "clip_gamma", "clip_zeta", "gate_mode", "sigmoid_bias", "gelu")


# ----------------------------------------------------------------------------- saving


def _own(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU in a storage of its own: an ensemble member's weights are views of the stacked tensors, and
    torch.save (safetensors too) would otherwise write, or refuse, the whole shared storage."""
    t = t.detach().to("cpu")
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes or t.storage_offset() else t.contiguous()


def _weights(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict as safetensors wants it: contiguous CPU tensors, each storage once."""
    sd = model.state_dict()
    for tied, kept in TIED.items():
        if tied in sd and kept in sd and sd[tied].data_ptr() == sd[kept].data_ptr():
            del sd[tied]
    return {k: _own(v) for k, v in sd.items()}


def save_checkpoint(out_dir, model: GPT, cfg: RunConfig, train_state: dict | None = None, *,
                    best: bool = False, extras: dict | None = None, write_state: bool = True) -> None:
    """Write model.safetensors + config.json (+ train_state.pt when `train_state` is given) in out_dir,
    or in out_dir/best with best=True (weights and config only).

    train_state: plain types/tensors (iter, optimizer state dict, RNG states, ...); the weights and the
    run config are added here so the file alone is a complete resume point. extras: JSON-able entries for
    config.json (e.g. {"tokenizer": ..., "dataset": ...}). Raises QuietError on an unwritable folder or a
    full disk, leaving the previous files intact.
    """
    folder = Path(out_dir) / BEST if best else Path(out_dir)
    state = dict(train_state or {})
    step_id = state.setdefault("step_id", uuid.uuid4().hex)
    it = int(state.get("iter", -1))
    # extras end up inside train_state.pt, which torch.load(weights_only=True) reads back: a JSON round
    # trip turns numpy scalars (and anything else exotic) into plain types it accepts.
    extras = json.loads(json.dumps(extras or {}, default=float))
    if train_state is not None and not best and write_state:
        state.update(format_version=FORMAT_VERSION, config=cfg.to_dict(), extras=dict(extras),
                     model={k: _own(v) for k, v in model.state_dict().items()})
        atomic_write(folder / STATE, lambda tmp: torch.save(state, tmp))
    tensors = _weights(model)
    meta = {"format": "quietgpt", "format_version": str(FORMAT_VERSION), "iter": str(it), "step_id": step_id}

    def write_weights(tmp: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, tmp, metadata=meta)

    atomic_write(folder / WEIGHTS, write_weights)
    doc = {**(extras or {}), **cfg.to_dict(), "format": "quietgpt", "format_version": FORMAT_VERSION,
           "iter": it, "step_id": step_id}
    atomic_write_json(folder / CONFIG, doc)


def published_step_ids(folder) -> tuple[str | None, str | None]:
    """step_id of folder's model.safetensors (its metadata) and of its config.json; None where a file is
    missing or unreadable."""
    folder = Path(folder)
    weights = config = None
    try:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            weights = (f.metadata() or {}).get("step_id")
    except Exception:  # missing, truncated or not safetensors: it needs rewriting either way
        pass
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8")).get("step_id")
    except (OSError, ValueError, AttributeError):
        pass
    return weights, config


def republish(out_dir, model: GPT, cfg: RunConfig, state: dict, *, extras: dict | None = None) -> bool:
    """Make out_dir's model.safetensors and config.json match the resume point `state` (whose weights are
    already in `model`). A crash after train_state.pt was written but before the weights or config were
    leaves them one checkpoint behind; resuming must not carry that on. The same holds for best/ when the
    resume point's save was also the best one. Returns True if it rewrote anything."""
    sid = state.get("step_id")
    if sid is None:
        return False
    published = {"iter": int(state["iter"]), "step_id": sid}
    rewrote = False
    if published_step_ids(out_dir) != (sid, sid):
        save_checkpoint(out_dir, model, cfg, published, extras=extras, write_state=False)
        rewrote = True
    if state.get("best_step_id") == sid and published_step_ids(Path(out_dir) / BEST) != (sid, sid):
        save_checkpoint(out_dir, model, cfg, published, best=True, extras=extras)
        rewrote = True
    return rewrote


# ----------------------------------------------------------------------------- loading


def read_config(ckpt_dir) -> dict:
    """config.json of a checkpoint folder as a dict (run config sections + tokenizer/dataset meta)."""
    path = Path(ckpt_dir) / CONFIG
    if not Path(ckpt_dir).is_dir():
        raise QuietError(f"checkpoint folder {ckpt_dir} does not exist; pass a training output folder")
    if not path.is_file():
        raise QuietError(f"{ckpt_dir} is not a checkpoint ({CONFIG} missing); pass a folder written by "
                         "`quietgpt train`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuietError(f"{path} is unreadable or corrupt ({e}); restore it or re-train") from None
    if not isinstance(doc, dict) or doc.get("format") != "quietgpt" or "model" not in doc:
        raise QuietError(f"{path} is not a quietgpt checkpoint config; pass a folder written by `quietgpt train`")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise QuietError(f"{path} has format version {doc.get('format_version')}, newer than this quietgpt "
                         f"reads ({FORMAT_VERSION}); upgrade quietgpt")
    return doc


def run_config_of(doc: dict) -> RunConfig:
    """The RunConfig stored in a config.json / train_state dict (extra entries ignored)."""
    try:
        return RunConfig.from_dict({k: v for k, v in doc.items() if k in SECTIONS})
    except QuietError as e:
        raise QuietError(f"checkpoint config is invalid: {e}") from None


def _new_model(mcfg: GPTConfig) -> GPT:
    # GPT.__init__ draws initial weights from the global RNG; loading must not perturb the caller's.
    with torch.random.fork_rng(devices=[]):
        return GPT(mcfg)


def load_model(ckpt_dir, device: str = "cpu") -> tuple[GPT, RunConfig]:
    """The model in ckpt_dir (a run folder or its best/), in eval mode on `device`, and its RunConfig.

    Raises QuietError (one line) when the folder, config.json or model.safetensors is missing,
    truncated or corrupt, or when the weights do not fit the stored architecture.
    """
    doc = read_config(ckpt_dir)
    cfg = run_config_of(doc)
    path = Path(ckpt_dir) / WEIGHTS
    if not path.is_file():
        raise QuietError(f"{ckpt_dir} has no {WEIGHTS}; pass a folder written by `quietgpt train`")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        raise QuietError(f"{path} is truncated or corrupt ({' '.join(str(e).split())[:120]}); restore it "
                         "or re-train") from None
    model = _new_model(cfg.model)
    _load_weights(model, tensors, str(path))
    return model.to(resolve_device(device)).eval(), cfg


def _load_weights(model: GPT, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy `tensors` (tied entries stored once) into model, checking names and shapes first."""
    expected = model.state_dict()
    for tied in TIED:
        expected.pop(tied, None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(TIED))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        how = "missing" if missing else "unexpected"
        raise QuietError(f"{where} does not match the model in its config.json ({how} tensor {name}); "
                         "the checkpoint is from another architecture or damaged")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise QuietError(f"{where}: tensor {k} has shape {tuple(tensors[k].shape)}, the config says "
                             f"{tuple(v.shape)}; the checkpoint is from another architecture or damaged")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])  # state_dict() tensors share storage with the parameters (and the tie)


def load_train_state(out_dir) -> dict:
    """train_state.pt of a run folder (weights_only: tensors and plain types only), or a QuietError when it
    is missing, truncated, corrupt or not a quietgpt resume point."""
    path = Path(out_dir) / STATE
    if not path.is_file():
        raise QuietError(f"nothing to resume in {out_dir} ({STATE} missing); run without --resume to start "
                         "fresh, or pass the --out of an earlier run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a pickle weights_only refuses, I/O error, ...
        raise QuietError(f"{path} is truncated, corrupt or unsafe ({_first_sentence(e)}); "
                         "restore it or start a fresh run in another --out") from None
    needed = ("format_version", "iter", "model", "optimizer", "config", "rng")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise QuietError(f"{path} is not a quietgpt resume point; start a fresh run in another --out")
    if int(state["format_version"]) > FORMAT_VERSION:
        raise QuietError(f"{path} has format version {state['format_version']}, newer than this quietgpt reads; "
                         "upgrade quietgpt")
    return state


def _first_sentence(e: BaseException, limit: int = 120) -> str:
    """An exception's message as one short plain line (torch's carry ANSI escapes and long advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    text = " ".join(text.split())
    text = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0]
    return text[:limit] or type(e).__name__


def check_compatible(saved: dict, cfg: RunConfig, where) -> None:
    """QuietError unless a run config dict `saved` (from a checkpoint) has the same architecture as cfg."""
    model = saved.get("model", {})
    for key in ARCH_KEYS:
        if key in model and model[key] != getattr(cfg.model, key):
            hint = ("the data's vocabulary differs from the checkpoint's" if key == "vocab_size"
                    else "resume with the same model settings")
            raise QuietError(f"checkpoint in {where} has model.{key}={model[key]!r} but this run has "
                             f"{getattr(cfg.model, key)!r}; {hint}, or choose another --out")


def load_state_into(model: GPT, state: dict, where) -> None:
    """Load train_state["model"] into model (strict), as a one-line QuietError on any mismatch."""
    try:
        model.load_state_dict(state["model"], strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        raise QuietError(f"weights in {where}/{STATE} do not fit this model ({' '.join(str(e).split())[:120]}); "
                         "resume with the same model settings or choose another --out") from None
