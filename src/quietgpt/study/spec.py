"""The study spec: which variants, seeds and baseline, what to measure, and the run config they share.

A study comes from a TOML file (a shipped study preset, quietgpt/presets/studies/*.toml, or a user's
file) whose [study] table is a `config.StudyConfig` and whose [model]/[data]/[train] tables are layered
on the `base` training preset; command-line options come last. `StudySpec` is that resolved study,
frozen, and `to_dict()` is what study.json records (a rerun compares it to refuse a changed config).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from quietgpt.config import (
    RECIPES,
    SECTIONS,
    DataConfig,
    Hypothesis,
    RunConfig,
    StudyConfig,
    TrainConfig,
    apply_overrides,
    check_baseline,
    load_config,
)
from quietgpt.errors import ConfigError
from quietgpt.measurement.registry import Metric, study_metrics
from quietgpt.nn.model import GPTConfig
from quietgpt.nn.variants import VARIANT_FIELDS, VARIANTS
from quietgpt.presets import read_toml, study_preset_names, study_preset_text, tomllib

MEASURE_KEYS = ("quant", "n_sequences", "calib_batches", "eval_tokens", "sensitivity")
COMPARED_KEYS = ("variants", "optimizers", "variant_options", "seeds", *MEASURE_KEYS, "run", "primary",
                 "alpha")  # change results
PER_RUN_KEYS = ("model.attention", "train.seed", "train.out_dir")  # set by the study for each run


@dataclass(frozen=True)
class StudySpec:
    """A resolved study. `run` is the run config every run shares (its out_dir, seed and attention are
    set per run by `run_config`); `overrides` lists, for the report, what was set on top of the base."""
    preset: str
    description: str
    train_preset: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    baseline: str
    quant: tuple[str, ...]
    n_sequences: int
    calib_batches: int
    eval_tokens: int | None
    run: RunConfig
    overrides: Mapping[str, str] = field(default_factory=dict)
    optimizers: tuple[str, ...] = ()  # crossed with the variants; () = the run config's one optimizer
    # options that belong to one variant ("model.gate_mode": "headwise"): set on that variant's runs only
    variant_options: Mapping[str, str] = field(default_factory=dict)
    sensitivity: tuple[str, ...] = ()  # quant configs also measured one tensor group at a time
    alpha: float = 0.05  # family-wise error rate of each Holm family
    primary: tuple[Hypothesis, ...] = ()  # the pre-registered hypotheses; every other comparison is exploratory
    source: str | None = None  # the study TOML file (a shipped preset's file in the package), for the record
    ensemble: bool = False  # each arm's seeds as one ensemble (the same runs, batched; not a result-changing key)

    def __post_init__(self) -> None:
        check_baseline(self.baseline, self.variants)

    @property
    def hypotheses_hash(self) -> str | None:
        """sha256 of the primary hypotheses and alpha (canonical JSON): what a pre-registration fixes."""
        if not self.primary:
            return None
        doc = json.dumps({"alpha": self.alpha, "primary": [h.to_dict() for h in self.primary]}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()

    # An arm is what one column of the report compares: an attention variant, or, when the study crosses
    # variants with optimizers, "variant+optimizer". Rows, run folders and statistics are keyed by arm.

    @property
    def arms(self) -> tuple[str, ...]:
        if not self.optimizers:
            return self.variants
        return tuple(f"{v}+{o}" for o in self.optimizers for v in self.variants)

    @property
    def baseline_arm(self) -> str:
        return f"{self.baseline}+{self.optimizers[0]}" if self.optimizers else self.baseline

    def arm_parts(self, arm: str) -> tuple[str, str]:
        """(attention variant or recipe, optimizer) of an arm: the arm's own "+optimizer", else the recipe's
        optimizer, else the run config's."""
        variant, _, optimizer = arm.partition("+")
        return variant, optimizer or str(RECIPES.get(variant, {}).get("train.optimizer", self.run.train.optimizer))

    def arm_settings(self, arm: str) -> dict[str, object]:
        """The settings an arm puts on the shared run config: its attention variant, or its recipe's bundle on
        softmax (config.RECIPES); its optimizer; the variant's own options (study.variant_options)."""
        variant, optimizer = self.arm_parts(arm)
        if variant in RECIPES:
            return {"model.attention": "softmax", **RECIPES[variant], "train.optimizer": optimizer}
        own = {k: v for k, v in self.variant_options.items() if VARIANT_FIELDS[k.split(".", 1)[1]] == variant}
        return {**own, "model.attention": variant, "train.optimizer": optimizer}

    def run_config(self, arm: str, seed: int, run_dir: str | Path) -> RunConfig:
        """The RunConfig of one run: the shared config with this arm's settings, seed, folder."""
        return apply_overrides(self.run, {**self.arm_settings(arm), "train.seed": seed, "train.out_dir": str(run_dir)})

    @property
    def metrics(self) -> dict[str, Metric]:
        """The registry's metrics this study records per run, in report order."""
        return study_metrics(self.quant, self.eval_tokens)

    @property
    def measure_settings(self) -> dict:
        return {k: list(getattr(self, k)) if k in ("quant", "sensitivity") else getattr(self, k) for k in MEASURE_KEYS}

    @property
    def device(self) -> str:
        return self.run.train.device

    def to_dict(self) -> dict:
        """study.json: plain JSON (the run config with out_dir "", since each run has its own)."""
        run = self.run.to_dict()
        run["train"]["out_dir"] = ""
        return {"preset": self.preset, "train_preset": self.train_preset, "description": self.description,
                "variants": list(self.variants), "seeds": list(self.seeds), "quant": list(self.quant),
                "n_sequences": self.n_sequences, "calib_batches": self.calib_batches,
                "eval_tokens": self.eval_tokens, "overrides": dict(self.overrides), "run": run,
                "baseline": self.baseline, "optimizers": list(self.optimizers), "arms": list(self.arms),
                "baseline_arm": self.baseline_arm, "variant_options": dict(self.variant_options),
                "sensitivity": list(self.sensitivity), "alpha": self.alpha,
                "primary": [h.to_dict() for h in self.primary], "hypotheses_hash": self.hypotheses_hash,
                "source": self.source, "ensemble": self.ensemble}

    @classmethod
    def from_dict(cls, d: Mapping) -> StudySpec:
        """From study.json (or results.json's "config"); a ConfigError when it does not describe a study."""
        try:
            run = dict(d["run"])
            run["train"] = {**run["train"], "out_dir": run["train"].get("out_dir") or "."}
            return cls(preset=str(d.get("preset", "?")), description=str(d.get("description", "")),
                       train_preset=str(d.get("train_preset", "?")), variants=tuple(d["variants"]),
                       seeds=tuple(int(s) for s in d["seeds"]), baseline=str(d.get("baseline", "softmax")),
                       quant=tuple(d.get("quant") or ()), n_sequences=int(d["n_sequences"]),
                       calib_batches=int(d["calib_batches"]), eval_tokens=d.get("eval_tokens"),
                       run=RunConfig.from_dict(run), overrides=dict(d.get("overrides") or {}),
                       optimizers=tuple(d.get("optimizers") or ()),
                       variant_options=dict(d.get("variant_options") or {}),
                       sensitivity=tuple(d.get("sensitivity") or ()), alpha=float(d.get("alpha", 0.05)),
                       primary=tuple(Hypothesis(**h) for h in d.get("primary") or ()), source=d.get("source"),
                       ensemble=bool(d.get("ensemble", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"not a study config ({type(e).__name__}: {e}); rerun `quietgpt study`") from None


def differences(old: Mapping, new: Mapping) -> list[str]:
    """Dotted names of the settings that differ between two study.json dicts (only those that change
    results: COMPARED_KEYS)."""
    a = _flat({k: old.get(k) for k in COMPARED_KEYS})
    b = _flat({k: new.get(k) for k in COMPARED_KEYS})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _new_default(k, a, b, "run."))


# A setting quietgpt added after a study was made is absent from its files; at its default it changes
# nothing, so it does not make the old study (or run) another config.
@functools.cache
def _defaults() -> dict:
    return {**_flat({"model": GPTConfig().to_dict(), "data": asdict(DataConfig()), "train": asdict(TrainConfig())}),
            "optimizers": [], "sensitivity": [], "measure.sensitivity": [], "primary": [], "alpha": 0.05}


def _new_default(key: str, old: Mapping, new: Mapping, prefix: str) -> bool:
    """Is `key` missing (or None) in the old flat dict and at its default in the new one?"""
    bare = key[len(prefix):] if key.startswith(prefix) else key
    return old.get(key) is None and bare in _defaults() and new.get(key) == _defaults()[bare]


def same_record(old: Mapping | None, new: Mapping) -> bool:
    """Does a run's stored run_config record (result.json) hold the same config as `new`, counting settings
    added since (absent in the old record, at their default now) as the same?"""
    if old is None:
        return False
    a, b = _flat(dict(old)), _flat(dict(new))
    return all(a.get(k) == b.get(k) or _new_default(k, a, b, "run.") for k in set(a) | set(b))


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


# ----------------------------------------------------------------------------- from a TOML file


def _study_source(preset: str) -> str | None:
    """The file a study preset name or path reads (a shipped preset's file inside the package)."""
    if preset in study_preset_names():
        from importlib import resources

        return str(resources.files("quietgpt.presets.studies").joinpath(f"{preset}.toml"))
    return str(Path(preset).resolve()) if Path(preset).is_file() else None


def _study_doc(preset: str) -> tuple[dict, str]:
    """(the study TOML as a dict, its name): a shipped study preset by name, or a user's .toml file (whose
    [study] table may be absent: the file is then the base run config with the default study settings)."""
    if preset in study_preset_names():
        return tomllib.loads(study_preset_text(preset)), preset
    if preset.endswith(".toml") or Path(preset).exists():
        return read_toml(preset), preset
    raise ConfigError(f"unknown study preset {preset!r}; choose one of {', '.join(study_preset_names())} "
                      "or pass a .toml file with a [study] table")


def _flat_str(tables: Mapping[str, Mapping]) -> dict[str, str]:
    """{"section.key": text}; a table inside a section (train.optimizer_args) as "section.table.key"."""
    return {f"{sec}.{k}{'.' + sub if sub else ''}": str(x) for sec, t in tables.items() for k, v in t.items()
            for sub, x in (v.items() if isinstance(v, dict) else [("", v)])}


def _check_quant_per_arm(spec: StudySpec) -> None:
    """A quant config whose transform an arm's model cannot take (SmoothQuant or the rotation on a recipe with
    another norm or block) is an error now, not a failed evaluation per run."""
    from quietgpt.quant.spec import parse_quant_list
    from quietgpt.quant.transforms import check_transforms

    configs = parse_quant_list([*spec.quant, *spec.sensitivity])
    for arm in spec.arms:
        model = spec.run_config(arm, spec.seeds[0], ".").model
        for q in configs:
            check_transforms(getattr(q, "smooth", None) is not None, bool(getattr(q, "rotate", False)), model)


def check_arm_name(name: str) -> None:
    """A study variant is an attention variant or a recipe (config.RECIPES); else a one-line ConfigError."""
    if name not in RECIPES and name not in VARIANTS:
        raise ConfigError(f"unknown attention variant or recipe {name!r}; choose among the variants "
                          f"{', '.join(VARIANTS)} and the recipes {', '.join(RECIPES)}")


def _split_variant_options(tables: dict, cli: dict, variants: Sequence[str]) -> tuple[dict, dict, dict]:
    """(tables, cli, variant options): the options that belong to one variant (model.VARIANT_FIELDS, e.g.
    model.gate_mode for outgate) taken out of the shared run config, to be set on that variant's runs only
    (the shared config would refuse them on the others). One whose variant is not studied is an error."""
    found = {f"model.{k}": str(v) for k, v in tables.get("model", {}).items() if k in VARIANT_FIELDS}
    found |= {k: v for k, v in cli.items() if k.startswith("model.") and k[6:] in VARIANT_FIELDS}
    for key in found:
        owner = VARIANT_FIELDS[key[6:]]
        if owner not in variants:
            raise ConfigError(f"{key} is an option of attention variant {owner}, which is not among the study's "
                              f"variants ({', '.join(variants)}); add {owner} to --variants or leave {key} out")
    tables = {**tables, "model": {k: v for k, v in tables.get("model", {}).items() if k not in VARIANT_FIELDS}}
    return tables, {k: v for k, v in cli.items() if k not in found}, found


def resolve_spec(preset: str = "default", *, variants: Sequence[str] | None = None, seeds: int | None = None,
                 baseline: str | None = None, data: str | None = None, device: str | None = None,
                 overrides: Mapping | None = None, quant: Sequence[str] | None = None,
                 optimizers: Sequence[str] | None = None, sensitivity: Sequence[str] | None = None,
                 seed_start: int | None = None, ensemble: bool | None = None) -> StudySpec:
    """The study `preset` (name or TOML path) with the caller's choices on top; every bad value is a
    one-line ConfigError naming it."""
    from quietgpt.quant.spec import parse_quant_list

    doc, name = _study_doc(preset)
    unknown = sorted(k for k in doc if k not in SECTIONS and k != "study")
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] in {name}; use [study], [model], [data] or [train]")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
    given = {k: v for k, v in {"variants": variants, "seeds": seeds, "baseline": baseline, "optimizers": optimizers,
                               "quant": None if quant is None else list(quant),
                               "sensitivity": None if sensitivity is None else list(sensitivity),
                               "seed_start": seed_start, "ensemble": ensemble}.items()
             if v is not None}
    for v in variants or doc.get("study", {}).get("variants") or ():  # a bad name first, then the baseline check
        check_arm_name(v)
    sc = StudyConfig.from_dict({**doc.get("study", {}), **given}, f"[study] of {name}")
    base = sc.base if "study" in doc else name  # a plain run-config file is its own base
    tables = {k: v for k, v in doc.items() if k in SECTIONS} if "study" in doc else {}
    cli = {k: str(v) for k, v in (overrides or {}).items()}
    if data is not None:
        cli["data.source"] = data
    if device is not None:
        cli["train.device"] = device
    per_run = (*PER_RUN_KEYS, "train.optimizer") if sc.optimizers else PER_RUN_KEYS
    for key in per_run:
        if key in cli or key.split(".")[1] in tables.get(key.split(".")[0], {}):
            raise ConfigError(f"{key} is set per run by the study; use --variants/--optimizers/--seeds/--out instead")
    tables, cli, vopts = _split_variant_options(tables, cli, sc.variants)
    run = apply_overrides(apply_overrides(load_config(base), tables), cli)
    qs = tuple(c.name for c in parse_quant_list(list(sc.quant))) if sc.quant else ()
    sens = tuple(c.name for c in parse_quant_list(list(sc.sensitivity)))
    if any(c.kind != "simulated" for c in parse_quant_list(list(sens))):
        raise ConfigError("study.sensitivity takes simulated quant configs (w<bits>a<bits>...), not int8-dynamic")
    spec = StudySpec(preset=name, description=sc.description, train_preset=base, variants=sc.variants,
                     seeds=tuple(range(sc.seed_start, sc.seed_start + sc.seeds)), baseline=sc.baseline, quant=qs,
                     n_sequences=sc.n_sequences,
                     calib_batches=sc.calib_batches, eval_tokens=sc.eval_tokens or None,
                     run=replace(run, train=replace(run.train, out_dir=".")),
                     overrides={**_flat_str(tables), **cli, **vopts}, optimizers=sc.optimizers,
                     variant_options=vopts, sensitivity=sens, alpha=sc.alpha, primary=sc.primary,
                     source=_study_source(preset), ensemble=sc.ensemble)
    check_hypotheses(spec)
    _check_quant_per_arm(spec)
    return spec


def check_hypotheses(spec: StudySpec) -> None:
    """Each primary hypothesis names a metric the study compares (its penalty's quant config in the sweep) and an
    arm other than the baseline; a one-line ConfigError otherwise."""
    compared = [k for k, m in spec.metrics.items() if m.compared]
    for h in spec.primary:
        if h.metric not in compared:
            close = difflib.get_close_matches(h.metric, compared, n=1)
            raise ConfigError(f"study.primary {h.name}: metric {h.metric!r} is not one the study compares" + (
                f" (did you mean {close[0]}?)" if close else "") + "; a penalty needs its config in study.quant")
        if h.variant not in spec.arms or h.variant == spec.baseline_arm:
            others = [a for a in spec.arms if a != spec.baseline_arm]
            raise ConfigError(f"study.primary {h.name}: variant {h.variant!r} must be one of the arms compared with "
                              f"the baseline ({', '.join(others)})")
