"""Typed run configuration: model, data and training sections, loadable from TOML presets.

A run config is three dataclasses, each with defaults. Sources are layered: dataclass defaults, then a
preset or user TOML file (sections [model], [data], [train]), then command-line overrides
("train.max_iters=100"). Unknown sections or keys and values of the wrong type are ConfigErrors naming
the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from quietgpt.errors import ConfigError, QuietError
from quietgpt.nn.model import GPTConfig
from quietgpt.presets import read_toml, tomllib
from quietgpt.quant.spec import parse_quant_list


@dataclass
class DataConfig:
    # "synthetic" (the embedded task), "shakespeare_char", a path to a UTF-8 .txt file or a folder of
    # them, or "hf:NAME[:CONFIG]" for a Hugging Face dataset (needs the hf extra).
    source: str = "synthetic"
    # auto | char | byte | gpt2 (auto: the synthetic task's own, else char; with train.init a text source's
    # auto is gpt2, the pretrained model's own: RunConfig resolves it)
    tokenizer: str = "auto"
    val_fraction: float = 0.1
    cache_dir: str = ""  # where prepared .bin files live; "" = the user cache dir
    synthetic_tokens: int = 1_000_000  # length of the embedded corpus, in tokens
    synthetic_seed: int = 1234  # the corpus is a pure function of this seed

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.tokenizer not in ("auto", "char", "byte", "gpt2"):
            raise ConfigError(f"data.tokenizer {self.tokenizer!r} is unknown; choose auto, char, byte or gpt2")
        if self.synthetic_tokens < 10_000:
            raise ConfigError(f"data.synthetic_tokens must be >= 10000, got {self.synthetic_tokens!r}")


OPTIMIZERS = ("adamw", "muon", "orthoadam")  # quietgpt's own, built by training/optim.py


@dataclass(frozen=True)
class LibraryOptimizer:
    """An optimizer of the pytorch-optimizer library with quietgpt's defaults for it: the scheduled rate times
    `lr_scale`, train.weight_decay times `wd_scale`; everything else the library's defaults (its paper's)."""
    cls: str  # the class in pytorch_optimizer
    lr_scale: float = 1.0
    wd_scale: float = 1.0
    source: str = ""


# Named optimizers of pytorch-optimizer (kozistr/pytorch_optimizer; README "Dependencies" says why this library).
# Any other of its 128 optimizers is reachable as train.optimizer = "lib:<name>" (its lower-case registry name)
# with the scheduled rate and the library's defaults.
LIBRARY_OPTIMIZERS: dict[str, LibraryOptimizer] = {
    # Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam": Adam in Shampoo's eigenbasis,
    # preconditioner refreshed every 10 steps; He et al. 2024 pair it with the outlier-protected block
    "soap": LibraryOptimizer("SOAP", source="Vyas et al. 2024; betas (0.95, 0.95), precondition_frequency 10"),
    # Anil et al. 2020, "Scalable Second Order Optimization for Deep Learning" (the practical Shampoo: blocked
    # statistics, grafting, inverse roots every preconditioning_compute_steps)
    "shampoo": LibraryOptimizer("ScalableShampoo", source="Anil et al. 2020; the library's defaults"),
    # Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms": the sign update is larger than Adam's,
    # so their rule is a 3-10x smaller rate and a 3-10x larger decoupled weight decay; here the 3x end of it
    "lion": LibraryOptimizer("Lion", lr_scale=1 / 3, wd_scale=3.0, source="Chen et al. 2023; betas (0.9, 0.99)"),
}
LIBRARY_PREFIX = "lib:"


def library_optimizer(name: str) -> tuple[type, LibraryOptimizer]:
    """(pytorch_optimizer class, quietgpt's defaults) of a train.optimizer that is a library one ("soap", ...,
    or "lib:<registry name>"); a one-line ConfigError when the library lacks it or is not installed."""
    try:
        import pytorch_optimizer
    except ImportError:  # pragma: no cover - a core dependency
        raise ConfigError(f"train.optimizer={name} needs the pytorch-optimizer package; pip install "
                          "pytorch-optimizer") from None
    if name in LIBRARY_OPTIMIZERS:
        spec = LIBRARY_OPTIMIZERS[name]
        return getattr(pytorch_optimizer, spec.cls), spec
    own = name[len(LIBRARY_PREFIX):].lower()
    if not name.startswith(LIBRARY_PREFIX) or own not in pytorch_optimizer.get_supported_optimizers():
        raise ConfigError(f"train.optimizer {name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}, "
                          f"{', '.join(LIBRARY_OPTIMIZERS)} or lib:<name> of pytorch-optimizer (docs/training.md)")
    return pytorch_optimizer.load_optimizer(own), LibraryOptimizer(own)


def is_known_optimizer(name: str) -> bool:
    """Whether `name` can be a train.optimizer without importing the library (a lib: name is checked later)."""
    return name in OPTIMIZERS or name in LIBRARY_OPTIMIZERS or name.startswith(LIBRARY_PREFIX)

# Recipes: the fixes beyond the attention normaliser, each a named bundle of settings on the softmax baseline, so
# that a study can put them in study.variants beside the normaliser variants (an arm "osp", or "osp+adamw" with
# the optimizer crossed). Every recipe keeps softmax attention: its arm is compared with softmax + AdamW +
# pre-norm LayerNorm, paired by seed, and the metrics that are 0 by construction for softmax stay so.
RECIPES: dict[str, dict[str, object]] = {
    # Park et al., ACL 2025, "Outlier-Safe Pre-Training" (dmis-lab/Outlier-Safe-Pre-Training): Muon, single-scale
    # RMSNorm and the learnable embedding projections; their recipe's three parts together
    "osp": {"train.optimizer": "muon", "model.norm": "ssnorm", "model.embed_proj": True},
    # He et al., NeurIPS 2024, "Understanding and minimising outlier features" (bobby-he/simplified_transformers,
    # model=op): the outlier-protected block (no branch pre-norm, QK-norm, residual gain 0.2) with the run's optimizer
    "op": {"model.block": "op"},
    # one part of OSP alone: RMSNorm with one scalar gain (the ablation that says whether the norm alone helps)
    "ssnorm": {"model.norm": "ssnorm"},
}


@dataclass
class TrainConfig:
    out_dir: str = "out"
    seed: int = 1337
    # "" = random init; "hf:NAME_OR_PATH" = start from a pretrained Hugging Face GPT-2 (a save_pretrained
    # folder or a hub name) with this run's attention swapped in (quietgpt.interop.pretrained)
    init: str = ""
    device: str = "cpu"  # cpu | cuda | mps | auto
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (bf16 on CUDA if supported, else fp32)
    compile: bool = False
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    always_save_checkpoint: bool = True
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    max_nonfinite_skips: int = 10
    backend: str = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "quietgpt"
    optimizer: str = "adamw"  # adamw | muon | orthoadam | soap | shampoo | lion | lib:<name> (training/optim.py)
    # a library optimizer's constructor options ([train.optimizer_args] or --set train.optimizer_args.K=V),
    # plus lr_scale (the scheduled rate's multiplier) and wd_scale (train.weight_decay's); not for the own three
    optimizer_args: dict = field(default_factory=dict)
    muon_lr: float = 0.02  # muon: the hidden matrices' peak rate (Keller Jordan's); the rest uses learning_rate
    muon_momentum: float = 0.95  # muon: Nesterov momentum
    orthoadam_max_dim: int = 4096  # orthoadam: tensor axes up to this size get a random orthogonal basis
    # outliers through training (training/outliers.py): every outlier_interval steps (0 = never) the
    # registry's trajectory metrics on outlier_sequences fixed validation windows; every outlier_quant_every-th
    # time (0 = never) also the perplexity ratios of outlier_quant, calibrated on outlier_calib_batches
    outlier_interval: int = 0
    outlier_quant_every: int = 4
    outlier_sequences: int = 8
    outlier_quant: str = "w8a8,w4a8"
    outlier_calib_batches: int = 2

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.device not in ("cpu", "cuda", "mps", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device {self.device!r} is unknown; choose cpu, cuda, cuda:N, mps or auto")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"train.dtype {self.dtype!r} is unknown; choose auto, float32, bfloat16 or float16")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"train.backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise ConfigError("train.learning_rate must be > 0 and train.min_lr >= 0")
        for name in ("threads", "warmup_iters", "max_nonfinite_skips", "outlier_interval", "outlier_quant_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)!r}")
        self._check_outliers()
        if self.lr_decay_iters < 1:
            raise ConfigError(f"train.lr_decay_iters must be a positive integer, got {self.lr_decay_iters!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train.grad_clip and train.weight_decay must be >= 0 (grad_clip 0 disables clipping)")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"train.beta1/beta2 must be in [0, 1), got {self.beta1!r}, {self.beta2!r}")
        self._check_optimizer()
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir is empty; pass --out DIR")
        if self.init and (not self.init.startswith("hf:") or not self.init[3:].strip()):
            raise ConfigError(f"train.init must be '' (random init) or hf:NAME_OR_PATH (a pretrained GPT-2: a "
                              f"save_pretrained folder or a Hugging Face Hub name), got {self.init!r}")


    def _check_optimizer(self) -> None:
        """A known optimizer, and no option of another one changed from its default (it would be ignored)."""
        if self.optimizer not in OPTIMIZERS:
            self._check_library_optimizer()
        elif self.optimizer_args:
            raise ConfigError(f"train.optimizer_args are options of a library optimizer (soap, lion, ...), but the "
                              f"optimizer is {self.optimizer}; leave them out or choose a library optimizer")
        owners = {"muon_lr": "muon", "muon_momentum": "muon", "orthoadam_max_dim": "orthoadam"}
        for key, owner in owners.items():
            if getattr(self, key) != getattr(TrainConfig, key) and self.optimizer != owner:
                raise ConfigError(f"train.{key} is an option of train.optimizer={owner}, but the optimizer is "
                                  f"{self.optimizer}; set train.optimizer={owner} or leave train.{key} out")
        if self.muon_lr <= 0 or not 0.0 <= self.muon_momentum < 1.0 or self.orthoadam_max_dim < 0:
            raise ConfigError("train.muon_lr must be > 0, train.muon_momentum in [0, 1) and "
                              "train.orthoadam_max_dim >= 0")

    def _check_library_optimizer(self) -> None:
        """train.optimizer is the library's, and every optimizer_args key one of its constructor's named options
        (the library's constructors take **kwargs and would ignore a misspelt one)."""
        import inspect

        cls, _ = library_optimizer(self.optimizer)
        named = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params", "kwargs")}
        for key in self.optimizer_args:
            if key in ("lr", "weight_decay"):
                raise ConfigError(f"train.optimizer_args.{key} would be overridden by the schedule and the decay "
                                  "groups; set train.learning_rate and train.weight_decay, or lr_scale and wd_scale")
            if key not in named | {"lr_scale", "wd_scale"}:
                raise ConfigError(f"train.optimizer_args.{key} is not an option of pytorch_optimizer."
                                  f"{cls.__name__}; its options: {', '.join(sorted(named - {'lr'}))}, lr_scale, "
                                  "wd_scale")

    def _check_outliers(self) -> None:
        """The train.outlier_* settings: positive counts, and a quant list that quant.parse_quant_list reads."""
        for name in ("outlier_sequences", "outlier_calib_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        try:
            parse_quant_list(self.outlier_quant)
        except QuietError as e:
            raise ConfigError(f"train.outlier_quant: {e}") from None


@dataclass
class RunConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # A run that starts from a pretrained GPT-2 reads text through that model's tokenizer (GPT-2 BPE) unless
        # the user names another; resolved here, in the config, so that whoever prepares the data again (eval,
        # the study's measurement) gets the same tokens. The synthetic source keeps its own ("auto").
        if self.train.init and self.data.tokenizer == "auto" and self.data.source != "synthetic":
            self.data = dataclasses.replace(self.data, tokenizer="gpt2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """Build from nested dicts (a config.json or TOML); unknown sections or keys are errors."""
        return apply_overrides(cls(), d)


SECTIONS = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}


def _literal(value):
    """A command-line value as TOML reads it (0.5, true, [0.9, 0.95], "text"); bare text stays text."""
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _coerce(section: str, key: str, typ, value):
    """Check or convert `value` (from TOML or a command-line string) to the field's type."""
    where = f"{section}.{key}"
    if typ is dict:  # a table of options (train.optimizer_args): names to TOML values
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where} expects a table of options, got {value!r}; write {where}.NAME=VALUE")
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return _coerce(section, key, typ, typ(text))
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError(f"{where} expects {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} expects a finite number, got {value!r}")
    if (typ is bool and not isinstance(value, bool)) or (typ is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where} expects {typ.__name__}, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(f"{where} expects {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def config_keys() -> list[str]:
    """Every "section.key" a run config has."""
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)]


def suggest_keys(name: str) -> list[str]:
    """Existing "section.key" names for a key that is not one: those with the same key in another section
    (or, for a bare key, in any section), else the closest names (difflib)."""
    section, _, key = name.rpartition(".")
    keys = config_keys()
    same = [k for k in keys if k.split(".", 1)[1] == key and k != name]
    if same:
        return same
    pool = {k.split(".", 1)[1]: k for k in keys} if not section else {k: k for k in keys}
    scores = {k: difflib.SequenceMatcher(None, key if not section else name, k).ratio() for k in pool}
    best = max(scores.values())
    close = sorted((k for k, r in scores.items() if r >= 0.6 and r >= best - 0.1), key=lambda k: -scores[k])
    return [pool[k] for k in close[:3]]


def apply_overrides(cfg: RunConfig, updates: dict) -> RunConfig:
    """A new RunConfig with `updates` ({section: {key: value}} or {"section.key": value}) applied,
    every value type-checked and every section re-validated."""
    nested: dict[str, dict] = {}
    for k, v in updates.items():
        if "." in k:
            section, key = k.split(".", 1)
            nested.setdefault(section, {})[key] = v
        elif isinstance(v, dict):
            nested.setdefault(k, {}).update(v)
        else:
            found = suggest_keys(k)
            if any(f.endswith(f".{k}") for f in found):
                raise ConfigError(f"config key {k!r} needs a section: write {' or '.join(found)}")
            raise ConfigError(f"config key {k!r} needs a section, and no section has it; " + (
                f"did you mean {' or '.join(found)}?" if found else f"the keys are {', '.join(config_keys())}"))
    parts = {}
    for section, cls in SECTIONS.items():
        current = dataclasses.asdict(getattr(cfg, section))
        given = nested.pop(section, {})
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        for key, value in given.items():
            if key.startswith("optimizer_args.") and section == "train":  # --set train.optimizer_args.K=V
                current["optimizer_args"] = {**current["optimizer_args"], key.split(".", 1)[1]: _literal(value)}
                continue
            if key not in known:
                found = suggest_keys(f"{section}.{key}")
                raise ConfigError(f"unknown config key {section}.{key}; " + (
                    f"did you mean {' or '.join(found)}?" if found else
                    f"known {section} keys: {', '.join(sorted(known))}"))
            current[key] = _coerce(section, key, hints[key], value)
        parts[section] = cls(**current)
    if nested:
        raise ConfigError(f"unknown config section(s) {', '.join(sorted(nested))}; use model, data or train")
    return RunConfig(**parts)


SCHEDULE_KEYS = ("train.warmup_iters", "train.lr_decay_iters")


def scale_schedule(cfg: RunConfig, max_iters: int, explicit_keys=()) -> RunConfig:
    """cfg with train.max_iters = max_iters and the lr schedule stretched to match: warmup_iters and
    lr_decay_iters times max_iters / cfg.train.max_iters, rounded half up (lr_decay_iters at least 1), so
    a schedule that decayed exactly at the old end decays exactly at the new one. A key among
    `explicit_keys` ("train.warmup_iters", "train.lr_decay_iters": what the user set) keeps its value.
    This is what `--max-iters` does; `--set train.max_iters=N` sets the end alone."""
    old = cfg.train.max_iters
    updates: dict = {"train.max_iters": max_iters}
    if isinstance(max_iters, int) and not isinstance(max_iters, bool) and max_iters >= 1 and max_iters != old:
        for key in SCHEDULE_KEYS:
            if key not in explicit_keys:
                value = getattr(cfg.train, key.split(".", 1)[1])
                scaled = (2 * value * max_iters + old) // (2 * old)  # round(value * max_iters / old), half up
                updates[key] = max(scaled, 1) if key == "train.lr_decay_iters" else scaled
    return apply_overrides(cfg, updates)


def schedule_note(before: RunConfig, after: RunConfig) -> str | None:
    """One line saying how scale_schedule changed the schedule, or None if it did not."""
    changes = [f"{k} {getattr(before.train, k)} -> {getattr(after.train, k)}"
               for k in ("warmup_iters", "lr_decay_iters") if getattr(before.train, k) != getattr(after.train, k)]
    if not changes:
        return None
    return (f"--max-iters {after.train.max_iters} (was {before.train.max_iters}) scales the lr schedule: "
            f"{', '.join(changes)}; --set train.warmup_iters=... / train.lr_decay_iters=... to choose them yourself")


def parse_assignments(items: list[str]) -> dict:
    """["train.max_iters=100", ...] -> {"train.max_iters": "100", ...} (values typed later)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.max_iters=100)")
        out[key.strip()] = value
    return out


# ----------------------------------------------------------------------------- the [study] table


def check_baseline(baseline: str, variants: Sequence[str]) -> None:
    """The study's baseline must be one of its variants (StudyConfig and the StudySpec built from it, or
    read back from a study.json, hold the same rule)."""
    if baseline not in variants:
        raise ConfigError(f"the baseline {baseline!r} is not among the variants ({', '.join(variants)}); "
                          "add it to --variants or name another with --baseline")


DIRECTIONS = ("lower", "higher")
TESTS = ("sign-flip", "t")


@dataclass(frozen=True)
class Hypothesis:
    """One pre-registered primary hypothesis ([[study.primary]] in a study TOML): `variant` (an arm) has a
    `direction` ("lower" | "higher") value of `metric` (a registry key the study compares) than the baseline,
    decided by `test`: "sign-flip" (the exact one-sided sign-flip test, the default) or "t" (the one-sided
    paired t-test), Holm-corrected over the primary family at study.alpha. `sd`: a prior standard deviation
    of the paired difference (metric units) for the power printout; `note`: where the hypothesis comes from."""
    name: str
    metric: str
    variant: str
    direction: str = "lower"
    test: str = "sign-flip"
    sd: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.metric.strip() or not self.variant.strip():
            raise ConfigError("each [[study.primary]] needs a name, a metric and a variant")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"study.primary {self.name}: direction must be lower or higher, got {self.direction!r}")
        if self.test not in TESTS:
            raise ConfigError(f"study.primary {self.name}: test must be sign-flip or t, got {self.test!r}")
        if self.sd is not None and not (isinstance(self.sd, int | float) and self.sd > 0):
            raise ConfigError(f"study.primary {self.name}: sd must be a positive number, got {self.sd!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Hypothesis:
        known = {f.name for f in fields(cls)}
        if not isinstance(d, dict):
            raise ConfigError(f"study.primary in {where} must be a list of tables ([[study.primary]])")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown key study.primary.{unknown[0]} in {where}; known: {', '.join(sorted(known))}")
        kw = {k: (float(v) if k == "sd" and isinstance(v, int) and not isinstance(v, bool) else v)
              for k, v in d.items()}
        for k, v in kw.items():
            if k != "sd" and not isinstance(v, str):
                raise ConfigError(f"study.primary.{k} in {where} expects text, got {v!r}")
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StudyConfig:
    """A TOML file's [study] table: what `quietgpt study` trains and measures on top of the run config.

    The run config of every run is: the `base` training preset, then this file's [model]/[data]/[train]
    tables, then the command line's overrides; each run sets its own attention variant and seed.
    """
    description: str = ""
    wall_time: str = ""  # an estimate of the study's wall time and the machine it holds for (`quietgpt presets`)
    base: str = "default"  # the training preset (name or .toml path) the runs start from
    variants: tuple[str, ...] = ("softmax", "softmax1", "sink")
    seeds: int = 3  # seeds 0 .. seeds-1; every variant runs once per seed (a paired design)
    baseline: str = "softmax"  # the variant every other one is compared with; must be one of variants
    quant: tuple[str, ...] = ("w8a8", "w6a8", "w4a8")  # the quantization sweep (quant.parse_quant)
    n_sequences: int = 32  # validation windows for the activation and attention statistics
    calib_batches: int = 8  # training batches that calibrate activation quantization ranges
    eval_tokens: int = 0  # perplexity on the first eval_tokens validation tokens; 0 = the whole split
    optimizers: tuple[str, ...] = ()  # crossed with the variants (arms "variant+optimizer"); () = train.optimizer
    sensitivity: tuple[str, ...] = ()  # quant configs whose penalty is also measured one tensor group at a time
    seed_start: int = 0  # the first seed: a replication draws fresh seeds seed_start .. seed_start + seeds - 1
    alpha: float = 0.05  # family-wise error rate of each Holm family (the primary hypotheses; the exploratory rest)
    primary: tuple[Hypothesis, ...] = ()  # pre-registered hypotheses ([[study.primary]]); the rest is exploratory
    ensemble: bool = False  # train each arm's seeds as one batched ensemble (training/ensemble.py), not one by one

    @classmethod
    def from_dict(cls, table: dict, where: str = "[study]") -> StudyConfig:
        """From a TOML table (lists for variants/quant) or command-line strings ("a,b"); an unknown key or
        a value of the wrong type is a ConfigError naming `study.<key>`."""
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in table.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean study.{close[0]}?)" if close else ""
                raise ConfigError(f"unknown key study.{key}{hint} in {where}; known study keys: "
                                  f"{', '.join(sorted(known))}")
            if key == "primary":
                if not isinstance(value, list | tuple):
                    raise ConfigError(f"study.primary in {where} must be a list of tables ([[study.primary]])")
                values[key] = tuple(h if isinstance(h, Hypothesis) else Hypothesis.from_dict(h, where) for h in value)
            elif key in ("variants", "quant", "optimizers", "sensitivity"):
                items = value.split(",") if isinstance(value, str) else value
                if not isinstance(items, list | tuple) or not all(isinstance(x, str) for x in items):
                    raise ConfigError(f"study.{key} expects a list of names, got {value!r}")
                values[key] = tuple(x.strip() for x in items if x.strip())
            else:
                values[key] = _coerce("study", key, type(getattr(cls, key)), value)
        return cls(**values)

    def __post_init__(self) -> None:
        for name in ("seeds", "n_sequences"):
            if getattr(self, name) < 1:
                raise ConfigError(f"study.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.calib_batches < 0 or self.eval_tokens < 0 or self.eval_tokens == 1:
            raise ConfigError("study.calib_batches must be >= 0 and study.eval_tokens 0 (all) or >= 2")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"study.variants must name distinct attention variants or recipes, got "
                              f"{','.join(self.variants)!r}")
        check_baseline(self.baseline, self.variants)
        if self.seed_start < 0:
            raise ConfigError(f"study.seed_start must be >= 0, got {self.seed_start!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"study.alpha must be in (0, 1), got {self.alpha!r}")
        names = [h.name for h in self.primary]
        if len(set(names)) != len(names):
            raise ConfigError(f"study.primary names must be distinct, got {', '.join(names)}")
        bad = [o for o in self.optimizers if not is_known_optimizer(o)]
        if bad or len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(f"study.optimizers must name distinct optimizers among {', '.join(OPTIMIZERS)}, "
                              f"{', '.join(LIBRARY_OPTIMIZERS)} and lib:<name>, got "
                              f"{','.join(self.optimizers)!r}")


# A TOML file may carry a [study] table (read by `quietgpt study`; checked here too, so a typo in it is
# an error whichever verb reads the file); any other unknown table is a typo.
TOOL_SECTIONS = ("study",)


def load_config(preset: str = "default", overrides: dict | None = None) -> RunConfig:
    """Defaults <- preset/TOML file <- overrides. A [study] table is checked (StudyConfig) but not used
    here; any other unknown table or key is a ConfigError naming it."""
    doc = read_toml(preset)
    for k, v in doc.items():
        if not isinstance(v, dict):
            raise ConfigError(f"{k} = {v!r} in {preset} must be inside a table: [model], [data] or [train]")
    unknown = sorted(k for k in doc if k not in SECTIONS and k not in TOOL_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] in {preset}; use [model], [data] or [train] "
                          f"(other tools read [{'], ['.join(TOOL_SECTIONS)}])")
    if "study" in doc:
        StudyConfig.from_dict(doc["study"], f"[study] of {preset}")
    base = {k: v for k, v in doc.items() if k in SECTIONS}
    cfg = apply_overrides(RunConfig(), base)
    return apply_overrides(cfg, overrides or {})
