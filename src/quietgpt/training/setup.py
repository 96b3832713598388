"""Everything before the first step: the checks, the data, the model, the optimizer and the resume point.

All checks that can fail on user input run before the run folder is touched (only a resume may rewrite
published files that a crash left one checkpoint behind: checkpoint.republish).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quietgpt.config import RunConfig, TrainConfig, apply_overrides
from quietgpt.data.sources import Dataset
from quietgpt.errors import QuietError
from quietgpt.interop import pretrained
from quietgpt.nn.model import GPT
from quietgpt.runs import checkpoint as ckpt
from quietgpt.training.batches import TrainBatches, prepare_data
from quietgpt.training.checkpointer import has_checkpoint
from quietgpt.training.distributed import Dist, rank0_first
from quietgpt.training.evaluate import estimate_loss
from quietgpt.training.schedule import DROPOUT_STREAM, derive_seed
from quietgpt.training.state import TrainState, restore_rng
from quietgpt.training.step import StepParts, build_step_parts
from quietgpt.utils.device import amp_context

__all__ = ["TrainRun", "setup_run"]


@dataclass
class TrainRun:
    """What the loop works with: the run as configured, its data, its step parts and where it stands."""

    cfg: RunConfig  # model.vocab_size is the data's
    out: Path
    dist: Dist
    dataset: Dataset
    extras: dict  # {"tokenizer": .., "dataset": ..} meta, stored with every checkpoint
    parts: StepParts
    batches: TrainBatches
    state: TrainState  # after 0 steps, or the resume point
    resume: bool

    @property
    def tokens_per_step(self) -> int:
        """Training tokens of one optimizer step, all ranks together."""
        tc = self.cfg.train
        return tc.batch_size * self.cfg.model.block_size * tc.gradient_accumulation_steps


def split_accumulation(cfg: RunConfig, d: Dist) -> RunConfig:
    """Each of d.world processes takes an equal share of a step's gradient_accumulation_steps micro-batches
    (the global count, as in nanoGPT, which divides it by the world size). When the count is not a
    multiple of the world size (the presets' 1 under `torchrun --nproc_per_node 2`), round it up to the
    next multiple, so every rank keeps train.batch_size per micro-batch; rank 0 says so, and config.json
    records the count that ran (a 1-process resume of it computes the same global batch)."""
    accum, world = cfg.train.gradient_accumulation_steps, d.world
    if accum % world == 0:
        return cfg
    split = -(-accum // world) * world
    if d.master:
        print(f"quietgpt train: train.gradient_accumulation_steps {accum} -> {split} so that each of the {world} "
              f"processes takes {split // world} micro-batch(es) per step; the global batch is now "
              f"{split} x {cfg.train.batch_size} sequences (set it to a multiple of {world} to choose another)",
              file=sys.stderr, flush=True)
    return apply_overrides(cfg, {"train.gradient_accumulation_steps": split})


def setup_run(cfg: RunConfig, device: torch.device, d: Dist, *, resume: bool, progress: bool = True) -> TrainRun:
    """Check cfg against the run folder, prepare the data, build the model and its step parts, and, with
    resume, continue them from train_state.pt (weights, optimizer, GradScaler, RNG streams, TrainState).
    With train.init the model starts from the pretrained GPT-2 instead of its random init (quietgpt.interop.pretrained;
    cfg takes its architecture). Raises a one-line QuietError on anything that does not fit, before any file
    is written. `progress`: rank 0 prints what it resolved."""
    cfg = split_accumulation(cfg, d)
    tc = cfg.train
    out = Path(tc.out_dir)
    say = _printer(progress and d.master)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    # Check the resume point (or that we are not about to overwrite one) before any work.
    saved = None
    if resume:
        saved = ckpt.load_train_state(out)
        _check_same_init(saved, cfg, out)
    elif d.master and has_checkpoint(out):
        raise QuietError(f"{out} already holds a checkpoint; pass --resume to continue it, or choose another "
                         "--out (or delete the folder) to start over")
    amp = amp_context(tc.dtype, device)  # a dtype this device lacks fails before the data is prepared

    start, resolved = None, None  # the pretrained softmax GPT of a fresh train.init run, what it changed
    if tc.init:
        cfg, start, resolved = _resolve_init(cfg, saved, d)
    vocab = cfg.model.vocab_size  # prepare_data sets the data's; a pretrained model keeps its own
    dataset, cfg = prepare_data(cfg, d)
    extras = {"tokenizer": dataset.tokenizer.to_meta(), "dataset": dataset.meta}
    if tc.init:
        pretrained.check_vocab(dataset.vocab_size, dataset.tokenizer.name, vocab, tc.init)
        cfg = apply_overrides(cfg, {"model.vocab_size": vocab})
        say(resolved)  # said once every check passed: a bad input gets its one-line error and nothing else
        if saved is None:
            say(pretrained.tokenizer_note(dataset.tokenizer.name, dataset.vocab_size))
        extras["init"] = dict((saved or {}).get("extras", {}).get("init") or {"from": tc.init})
    if saved is not None:
        _check_saved_fits(saved, cfg, extras["tokenizer"], out)
    model = _new_model(cfg, d)
    if saved is not None:
        ckpt.load_state_into(model, saved, out)
        if d.master:
            ckpt.republish(out, model, cfg, saved, extras=extras)
    elif start is not None:
        how = pretrained.start_from(model, start)
        extras["init"]["swap"] = how
        say(f"{cfg.model.attention} from the pretrained softmax: {how}")
    model.to(device)
    parts = build_step_parts(model, cfg.train, device, d, amp=amp)
    if start is not None and d.master:
        extras["init"]["pretrained_loss"] = _pretrained_loss(start, dataset, cfg, parts, say)
    batches = TrainBatches(dataset.train, cfg.train, cfg.model.block_size, d, device)
    state = TrainState(world_size=d.world, seed=tc.seed)
    if saved is not None:
        state = _restore(saved, parts, batches, cfg.train, d, out)
    return TrainRun(cfg, out, d, dataset, extras, parts, batches, state, resume)


def _printer(on: bool) -> Callable[[str | None], None]:
    """say(line): "quietgpt train: line" on stderr when `on`; nothing when not, or for a None line."""
    def say(line: str | None) -> None:
        if on and line:
            print(f"quietgpt train: {line}", file=sys.stderr, flush=True)
    return say


def _resolve_init(cfg: RunConfig, saved: dict | None, d: Dist) -> tuple[RunConfig, GPT | None, str | None]:
    """cfg with the architecture train.init gives, the pretrained model and a line saying what it changed
    (None and None when resuming: the checkpoint's own config holds that architecture, and its weights
    replace the pretrained ones)."""
    if saved is not None:
        cfg, _ = pretrained.resolve_config(cfg, ckpt.run_config_of(saved["config"]).model.to_dict())
        return cfg, None, None
    with rank0_first(d):  # a hub name: rank 0 downloads into the cache, the others then read it
        start = pretrained.load_pretrained(cfg.train.init)
    cfg, changes = pretrained.resolve_config(cfg, start.config.to_dict())
    return cfg, start, pretrained.describe(start, cfg.train.init, changes)


def _pretrained_loss(start: GPT, dataset: Dataset, cfg: RunConfig, parts: StepParts,
                     say: Callable[[str | None], None]) -> dict[str, float]:
    """The pretrained softmax model's loss on the batches of the run's iteration-0 eval: how far the swap
    moved the start (the run's own step-0 eval follows). The pretrained copy leaves the device after."""
    losses = estimate_loss(start.to(parts.device), dataset, cfg.train, cfg.model.block_size, parts.device,
                           parts.amp)
    start.to("cpu")
    say(f"step 0 of the pretrained softmax model: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
        f"(the swapped {cfg.model.attention} model's step 0 follows)")
    return losses


def _check_same_init(saved: dict, cfg: RunConfig, out: Path) -> None:
    """QuietError unless the resume point started from the same train.init as this run says (a resume never
    reads the pretrained model again, so another one cannot mean anything)."""
    was = saved["config"].get("train", {}).get("init", "") if isinstance(saved.get("config"), dict) else ""
    if was != cfg.train.init:
        raise QuietError(f"the checkpoint in {out} started from {was or 'a random init'}, but this run says "
                         f"train.init={cfg.train.init!r}; resume with the checkpoint's own train.init, or choose "
                         "another --out")


def _check_saved_fits(saved: dict, cfg: RunConfig, tokenizer: dict, out: Path) -> None:
    """QuietError unless the resume point has cfg's architecture and the data's tokenizer."""
    ckpt.check_compatible(saved["config"], cfg, out)
    saved_tok = saved.get("extras", {}).get("tokenizer")
    if saved_tok is not None and json.dumps(saved_tok, sort_keys=True) != json.dumps(tokenizer, sort_keys=True):
        raise QuietError(f"checkpoint in {out} was trained with another tokenizer/vocabulary than "
                         f"{cfg.data.source!r} gives; resume with the same data, or choose another --out")


def _new_model(cfg: RunConfig, d: Dist) -> GPT:
    """cfg's model at its seeded init, and this rank's dropout stream seeded."""
    # the same init on every rank (DDP also broadcasts rank 0's); then per-rank dropout streams
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    torch.manual_seed(derive_seed(cfg.train.seed, DROPOUT_STREAM + d.rank))
    return model


def _restore(saved: dict, parts: StepParts, batches: TrainBatches, tc: TrainConfig, d: Dist, out: Path) -> TrainState:
    """Continue the optimizer, GradScaler and random streams from the train_state dict `saved`; its TrainState,
    stamped with this session's world size and seed (what its next save records)."""
    try:
        parts.optimizer.load_state_dict(saved["optimizer"])
        if parts.scaler is not None and saved.get("scaler"):
            parts.scaler.load_state_dict(saved["scaler"])
        state = TrainState.from_dict(saved)
        restore_rng(state.rng, batches.gen, parts.device, d, tc.seed, state.iter)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise QuietError(f"{out}/{ckpt.STATE} does not fit this run ({' '.join(str(e).split())[:120]}); "
                         "resume with the same settings or choose another --out") from None
    if state.iter > tc.max_iters:
        raise QuietError(f"the checkpoint in {out} is at iteration {state.iter}, past train.max_iters "
                         f"({tc.max_iters}); pass --max-iters {state.iter} or more")
    state.world_size, state.seed = d.world, tc.seed
    return state
