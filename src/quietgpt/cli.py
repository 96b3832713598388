"""The `quietgpt` command line: one function per verb.

Exit codes: 0 done, 2 bad input (a one-line message naming the problem and the fix, no traceback),
1 internal error (a bug: the traceback is shown), 130 interrupted, 141 the reader of its output went away
(`quietgpt presets | head`: it stops quietly, as a Unix tool killed by SIGPIPE would).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from quietgpt.errors import QuietError
from quietgpt.utils.version import __version__

# ----------------------------------------------------------------------------- shared options


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help where X says something; an option whose default is None,
    False or empty says in its own help what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if d is None or d is False or (isinstance(d, str | list) and not d):
            return action.help
        return super()._get_help_string(action)


def _add_config_args(p: argparse.ArgumentParser, preset_default: str | None = "default", *,
                     training: bool = True) -> None:
    """The run-config options: --preset, --data and --set, and with `training` the flags only training uses."""
    preset_help = "preset name (see `quietgpt presets`) or a .toml file"
    if preset_default is None:
        preset_help += " (default: default; with --resume, the checkpoint's own config)"
    p.add_argument("--preset", default=preset_default, help=preset_help)
    p.add_argument("--data", help="data source: synthetic, shakespeare_char, a .txt file or folder, hf:NAME "
                                  "(default: the preset's)")
    if training:
        from quietgpt.nn.variants import VARIANTS

        p.add_argument("--attention", help=f"attention variant: {', '.join(VARIANTS)} (default: the preset's)")
        p.add_argument("--seed", type=int, help="random seed (init, data order) (default: the preset's)")
        p.add_argument("--max-iters", type=int, metavar="N",
                       help="training iterations; also scales the preset's warmup_iters and lr_decay_iters by "
                            "N / its max_iters (rounded), so the lr still warms up and decays to min_lr at N, "
                            "unless you --set them; config.json records the scaled values. With --resume and no "
                            "--preset only the end moves (default: the preset's)")
        p.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set model.n_layer=2 (repeatable; flags win, but every "
                        "value is checked)")


_FLAGS = (("data", "data.source"), ("attention", "model.attention"), ("seed", "train.seed"),
          ("max_iters", "train.max_iters"), ("device", "train.device"), ("out", "train.out_dir"),
          ("init", "train.init"))


def _overrides(args: argparse.Namespace) -> dict:
    """Command-line flags -> {"section.key": value} config overrides (flags win over --set)."""
    from quietgpt.config import parse_assignments

    out = parse_assignments(args.set)
    for flag, key in _FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    return out


def _run_config(args: argparse.Namespace, base, *, scale: bool = True):
    """`base` (a preset name or .toml path, or a RunConfig such as a checkpoint's) <- every --set value, each
    typed and validated even where a flag then replaces it <- the flags. --max-iters N also scales the lr
    schedule (config.scale_schedule) unless `scale` is False or the user --set those keys."""
    from quietgpt.config import (
        RunConfig,
        apply_overrides,
        load_config,
        parse_assignments,
        scale_schedule,
        schedule_note,
    )

    sets = parse_assignments(args.set)
    # --attention goes in with the --set values (unless one sets model.attention itself), so that a variant's
    # own options (--attention outgate --set model.gate_mode=headwise) are checked against that variant
    attention = getattr(args, "attention", None)
    early = {**sets, "model.attention": attention} if attention and "model.attention" not in sets else sets
    cfg = apply_overrides(base, early) if isinstance(base, RunConfig) else load_config(base, early)
    flags = {key: getattr(args, flag) for flag, key in _FLAGS
             if getattr(args, flag, None) is not None and key != "train.max_iters"}
    cfg = apply_overrides(cfg, flags)
    n = getattr(args, "max_iters", None)
    if n is not None:
        before = cfg
        cfg = scale_schedule(cfg, n, explicit_keys=sets) if scale else apply_overrides(cfg, {"train.max_iters": n})
        note = schedule_note(before, cfg)
        if note and os.environ.get("RANK", "0") == "0":
            print(note)
    return cfg


# ----------------------------------------------------------------------------- verbs


def cmd_presets(args: argparse.Namespace) -> int:
    """List the shipped presets (training and study) with their descriptions, or print one as TOML."""
    from quietgpt.presets import (
        preset_description,
        preset_names,
        preset_text,
        preset_wall_time,
        study_preset_names,
        study_preset_text,
    )

    if args.name:
        study = args.kind == "study" or (args.kind is None and args.name in study_preset_names()
                                         and args.name not in preset_names())
        if study and args.name not in study_preset_names():
            raise QuietError(f"unknown study preset {args.name!r}; choose one of {', '.join(study_preset_names())}")
        print(study_preset_text(args.name) if study else preset_text(args.name), end="")
        return 0
    for kind, names, text in (("training presets (quietgpt train/prepare --preset NAME)", preset_names(),
                               preset_text),
                              ("study presets (quietgpt study --preset NAME)", study_preset_names(),
                               study_preset_text)):
        print(f"{kind}:")
        for name in names:
            print(f"  {name:22s} {preset_description(text(name))}")
            wall = preset_wall_time(text(name))
            if wall:
                print(f"  {'':22s} wall time: {wall}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenise the configured data source into the cache and say where it is."""
    from quietgpt.data.sources import check_length, prepare

    cfg = _run_config(args, args.preset)
    ds = prepare(cfg.data)
    m = ds.meta
    print(f"{'reused' if ds.reused else 'prepared'} {m['source']} ({m['tokenizer_name']} tokenizer, "
          f"vocab {ds.vocab_size}) in {ds.dir}")
    print(f"train {len(ds.train):,} tokens, val {len(ds.val):,} tokens ({m['dtype']})")
    if m.get("irreducible_loss") is not None:
        window = m.get("irreducible_loss_window", {}).get(str(cfg.model.block_size))
        extra = f"; a window of {cfg.model.block_size} tokens reaches <= {window:.4f}" if window else ""
        print(f"irreducible loss {m['irreducible_loss']:.4f} nats/token{extra}")
    check_length(ds, cfg.model.block_size)  # fail now, not at the first batch of training
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one model into --out; --resume continues it (with its own config unless --preset is given)."""
    from quietgpt.config import load_config
    from quietgpt.training.loop import train

    if args.seeds is not None:
        return _train_seeds(args)
    if args.resume and args.preset is None:
        from quietgpt.runs import checkpoint

        out = _overrides(args).get("train.out_dir", load_config("default").train.out_dir)
        try:
            doc = checkpoint.read_config(out)
        except QuietError:  # killed before config.json was first written: the resume point has it too
            doc = checkpoint.load_train_state(out)["config"]
        # the run keeps the schedule it was started with: --max-iters only moves its end
        cfg = _run_config(args, checkpoint.run_config_of(doc), scale=False)
    else:
        cfg = _run_config(args, args.preset or "default")
    summary = train(cfg, resume=args.resume, progress=True)
    if summary.get("world_size", 1) == 1 or os.environ.get("RANK", "0") == "0":
        print(f"val loss {summary['val_loss']:.4f} (best {summary['best_val_loss']:.4f}), "
              f"train loss {summary['train_loss']:.4f}, {summary['iters']} iters, "
              f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, {summary['wall_s']:.1f} s -> {cfg.train.out_dir}")
    return 0


def _train_seeds(args: argparse.Namespace) -> int:
    """`train --seeds 0-9`: every seed as one ensemble member, each in --out/s<seed> (training/ensemble.py);
    --resume continues each member folder that holds a resume point."""
    from quietgpt.training.checkpointer import has_checkpoint
    from quietgpt.training.ensemble import MemberFailed, ensemble_configs, parse_seeds, train_ensemble

    if args.seed is not None:
        raise QuietError("pass either --seed (one run) or --seeds (an ensemble of runs), not both")
    seeds = parse_seeds(args.seeds)
    base = _run_config(args, args.preset or "default")
    cfgs = ensemble_configs(base, seeds, base.train.out_dir)
    resume = [bool(args.resume) and has_checkpoint(Path(c.train.out_dir)) for c in cfgs]
    results = train_ensemble(cfgs, resume=resume, progress=True)
    failed = 0
    for cfg, r in zip(cfgs, results, strict=True):
        if isinstance(r, MemberFailed):
            failed += 1
            print(f"seed {r.seed}: FAILED: {r.error}")
        else:
            print(f"seed {cfg.train.seed}: val loss {r['val_loss']:.4f} (best {r['best_val_loss']:.4f}), "
                  f"{r['tokens_per_s'] or 0:,.0f} tokens/s, {r['wall_s']:.1f} s -> {cfg.train.out_dir}")
    print(f"ensemble of {len(cfgs)}: peak memory {results_peak(results) / 2**20:.0f} MiB")
    return 2 if failed else 0


def results_peak(results: list) -> float:
    return max((r.get("peak_memory_bytes") or 0 for r in results if isinstance(r, dict)), default=0)


def cmd_sample(args: argparse.Namespace) -> int:
    """Print --num-samples continuations of --prompt from a checkpoint (its own tokenizer)."""
    import torch

    from quietgpt.data.tokenizers import tokenizer_from_meta
    from quietgpt.runs.checkpoint import load_model, read_config

    for name, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--num-samples", args.num_samples, 1),
                             ("--top-k", args.top_k, 1)):
        if value < low:
            raise QuietError(f"{name} must be >= {low}, got {value}")
    if not args.temperature >= 0:
        raise QuietError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    doc = read_config(args.checkpoint)
    if "tokenizer" not in doc:
        raise QuietError(f"{args.checkpoint}/config.json has no tokenizer; it was not written by `quietgpt train`")
    tok = tokenizer_from_meta(doc["tokenizer"])
    model, _ = load_model(args.checkpoint, args.device)
    prompt = args.prompt if args.prompt is not None else ("NEW" if tok.name == "synthetic" else "\n")
    ids = tok.encode(prompt)
    if not ids:
        raise QuietError(f"the prompt {prompt!r} encodes to no tokens with the {tok.name} tokenizer; pass --prompt")
    x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    for i in range(args.num_samples):
        y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           seed=args.seed + i)
        # a padded vocabulary (GPT-2's 50304) has ids the tokenizer cannot decode; they are never targets
        print(tok.decode([t for t in y[0].tolist() if t < tok.vocab_size]))
        if args.num_samples > 1:
            print("---------------")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Measure a checkpoint (or a saved HF GPT-2) and write the full report as JSON (metrics.Measurement)."""
    from quietgpt.measurement.evaluate import evaluate_checkpoint, evaluate_hf
    from quietgpt.quant.spec import parse_quant_list
    from quietgpt.utils.atomic import atomic_write_json

    quant = [q.name for q in parse_quant_list(args.quant)]  # a bad name fails before any loading
    sensitivity = [q.name for q in parse_quant_list(args.sensitivity)]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if (args.checkpoint is None) == (args.hf is None):
        raise QuietError("pass exactly one of --checkpoint DIR (a training output folder) or --hf PATH")
    from quietgpt.utils.device import resolve_device

    kw = dict(quant=quant, device=str(resolve_device(args.device)), n_sequences=args.n_sequences,
              calib_batches=args.calib_batches, seed=args.seed, batch_size=args.batch_size, sensitivity=sensitivity)
    if args.hf is not None:
        if not args.data:
            raise QuietError("--hf needs --data SOURCE (a .txt file or folder, or hf:NAME) to evaluate on")
        result = evaluate_hf(args.hf, data=args.data, tokenizer=args.tokenizer, cache_dir=args.cache_dir, **kw)
    else:
        result = evaluate_checkpoint(args.checkpoint, data=args.data, **kw)
    atomic_write_json(args.json, result)
    from quietgpt.measurement.registry import catalogue

    ppl = result["perplexity"]
    s = result["summary"]
    print(f"perplexity fp {ppl['fp']:.4f} over {ppl['tokens']} tokens"
          + "".join(f", {q} {ppl[q]:.4f}" for q in quant))
    for key, m in catalogue(quant, result.get("eval_tokens")).items():  # the registry's eval metrics
        if m.source == "eval" and not key.startswith("ppl") and s.get(key) is not None:
            print(f"{m.label} ({key}): {s[key]:.4g}")
    for q, groups in (result.get("sensitivity") or {}).items():
        worst = sorted(((g, r) for g, r in groups.items() if g != "all"), key=lambda t: -t[1])[:5]
        print(f"{q} one group at a time (ratio to FP): all {groups['all']:.4g}; largest "
              + ", ".join(f"{g} {r:.4g}" for g, r in worst))
    print(f"wrote {args.json} ({result['wall_s']:.1f} s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint as a Hugging Face model folder (quietgpt.interop.hf_export) and say how to load it."""
    from quietgpt.interop.hf_export import export_checkpoint

    s = export_checkpoint(args.checkpoint, args.hf, force=args.force, dtype=args.dtype)
    how = "" if s["kind"] == "gpt2" else ", trust_remote_code=True"  # softmax: a plain GPT2LMHeadModel
    print(f"exported the {s['attention']} model (iter {s['iter']}, {s['dtype']}) to {s['out']}; load it with "
          f"AutoModelForCausalLM.from_pretrained({s['out']!r}{how})")
    print(f"max |logit difference| from the checkpoint: {s['max_logit_diff']:.2g} (float32)")
    print(s["tokenizer"])
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Train every (variant, seed), measure, compare, write results.json/csv and the report."""
    from quietgpt.config import parse_assignments
    from quietgpt.study import run_study

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()] if args.optimizers else None
    if args.plan:  # what the seeds can detect; nothing is trained
        from quietgpt.study.power import plan_text
        from quietgpt.study.spec import resolve_spec

        print(plan_text(resolve_spec(args.preset, variants=variants, seeds=args.seeds, baseline=args.baseline,
                                     optimizers=optimizers, data=args.data, device=args.device,
                                     overrides=parse_assignments(args.set), seed_start=args.seed_start)))
        return 0
    if not args.out:
        raise QuietError("quietgpt study needs --out DIR (the study folder)")
    results = run_study(args.out, args.preset, variants=variants, seeds=args.seeds, baseline=args.baseline,
                        optimizers=optimizers,
                        data=args.data,
                        device=args.device, overrides=parse_assignments(args.set), jobs=args.jobs,
                        quant=None if args.quant is None else [q for q in args.quant.split(",") if q.strip()],
                        sensitivity=None if args.sensitivity is None else
                        [q for q in args.sensitivity.split(",") if q.strip()],
                        launcher=args.launcher, force=args.force, progress=True, seed_start=args.seed_start,
                        ensemble=True if args.ensemble else None)
    _print_study(results, args.out)
    return 0


def _print_study(results: dict, out: str) -> None:
    from quietgpt.report import text_summary

    print(text_summary(results))
    print(f"report: {out}/report.md and {out}/report.html; data: {out}/results.json, {out}/results.csv")


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild results.json/csv, report.md/html and plots from the run folders, without training."""
    from quietgpt.study import rebuild

    out = rebuild(args.dir)
    _print_study(out["results"], args.dir)
    return 0


# ----------------------------------------------------------------------------- parser


def _add_eval(verb) -> None:
    """The `eval` verb and its options."""
    from quietgpt.data.sources import user_cache_dir

    p = verb("eval", help="measure kurtosis, infinity norms, abstention, perplexity, quantized perplexity")
    p.add_argument("--checkpoint", help="a training output folder")
    p.add_argument("--hf", help="a saved Hugging Face GPT-2 model folder instead of --checkpoint")
    p.add_argument("--data", help="data source (default: the checkpoint's own)")
    p.add_argument("--quant", default="w8a8", help="comma-separated quant configs, e.g. w8a8,w4a8-g32-e8,"
                   "w4a16-g128-gptq ('' for none; the grammar: docs/quantization.md)")
    p.add_argument("--sensitivity", default="", help="comma-separated quant configs whose penalty is also measured "
                   "one tensor group at a time (each block's weights and activations, the embeddings, the head)")
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--tokenizer", choices=["auto", "char", "byte", "gpt2"],
                   help="with --hf: how to tokenise --data (default: gpt2 when the model has GPT-2's "
                        "vocabulary, else auto)")
    cache = str(user_cache_dir()).replace("%", "%%")
    p.add_argument("--cache-dir", default="", help=f"with --hf: where to cache the tokenised data (default: {cache}, "
                   "i.e. $QUIETGPT_CACHE, else $XDG_CACHE_HOME/quietgpt, else ~/.cache/quietgpt)")
    p.add_argument("--n-sequences", type=int, default=64, help="validation windows for activation statistics")
    p.add_argument("--calib-batches", type=int, default=16, help="training batches to calibrate quantization")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="picks the statistics windows and calibration batches")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(fn=cmd_eval)



def _add_study(verb) -> None:
    """The `study` verb and its options."""
    p = verb("study", help="train variants over seeds, measure them, and write a report")
    p.add_argument("--preset", default="default",
                   help="study preset (see `quietgpt presets`) or a .toml file with a [study] table")
    p.add_argument("--out", help="study folder (required unless --plan)")
    p.add_argument("--variants", help="comma-separated attention variants (default: the study preset's)")
    p.add_argument("--seeds", type=int, help="number of seeds (default: the study preset's)")
    p.add_argument("--seed-start", type=int, help="the first seed; fresh seeds for a replication (default: the "
                   "study preset's, 0)")
    p.add_argument("--ensemble", action="store_true", help="train each arm's seeds as one batched ensemble in one "
                   "process (the same runs; faster for small models; default: the study preset's)")
    p.add_argument("--plan", action="store_true", help="print what the study's seeds can detect (the exact test's "
                   "smallest p; per primary hypothesis the effect detectable with 80%% and 90%% power) and stop")
    p.add_argument("--baseline", help="the variant the others are compared with (default: the study preset's, "
                   "softmax)")
    p.add_argument("--optimizers", help="comma-separated optimizers (adamw, muon, orthoadam) to cross with the "
                   "variants: one arm per variant+optimizer, compared with baseline+first optimizer (default: the "
                   "study preset's; none = train.optimizer)")
    p.add_argument("--data", help="data source (default: the study preset's)")
    p.add_argument("--device", help="cpu, cuda, mps or auto (default: the study preset's)")
    p.add_argument("--quant", help="comma-separated quantization sweep (default: the preset's, e.g. "
                   "w8a8,w6a8,w4a8; '' for none; the grammar: docs/quantization.md)")
    p.add_argument("--sensitivity", help="comma-separated quant configs whose penalty is also measured one tensor "
                   "group at a time (default: the preset's; '' for none)")
    p.add_argument("--jobs", type=int,
                   help="runs at a time: a local process pool (CPU threads split between runs, one GPU per run "
                        "when there are several); default: one per CPU core on CPU, one per GPU on CUDA; "
                        "with --launcher slurm, the array's parallelism (default 1)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="where runs execute: this machine, or a SLURM job array via submitit (pip install "
                        "'quietgpt[slurm]')")
    p.add_argument("--force", action="store_true",
                   help="accept a changed config in an existing study folder: runs whose config changed are redone")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a run config field for every run, e.g. --set model.n_layer=2 (repeatable)")
    p.set_defaults(fn=cmd_study)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quietgpt", formatter_class=_HelpFormatter,
        description="Train GPTs whose attention normaliser is a choice (softmax, softmax1, ...), measure their "
                    "outliers and what quantization (any bit width, practitioners' methods) costs them, and compare "
                    "them in a study with paired statistics and an honest report.")
    parser.add_argument("--version", action="version", version=f"quietgpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows attention paths)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verb = functools.partial(sub.add_parser, formatter_class=_HelpFormatter)

    p = verb("presets", help="list the shipped training and study presets, or print one")
    p.add_argument("name", nargs="?", help="a preset name (or .toml path) to print as TOML (the training "
                   "preset when both kinds have the name, unless --kind study)")
    p.add_argument("--kind", choices=["train", "study"], help="which kind of preset NAME is (default: training, "
                   "unless only a study preset has the name)")
    p.set_defaults(fn=cmd_presets)

    p = verb("prepare", help="tokenise a data source into cached train.bin / val.bin")
    _add_config_args(p, training=False)
    p.set_defaults(fn=cmd_prepare)

    p = verb("train", help="train one model")
    _add_config_args(p, preset_default=None)  # None: "default", or the checkpoint's own config with --resume
    p.add_argument("--out", help="output folder (checkpoints, metrics.jsonl, summary.json) (default: the preset's "
                                 "train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the checkpoint in --out")
    p.add_argument("--seeds", metavar="SEEDS", help="train several seeds (e.g. 0-9 or 0,3,7) as one batched ensemble "
                   "in one process, each in --out/s<seed>, each the run that seed would be alone")
    p.add_argument("--init", metavar="hf:NAME_OR_PATH",
                   help="start from a pretrained Hugging Face GPT-2 (a save_pretrained folder or a hub name) with "
                        "--attention swapped in: its architecture replaces the preset's, text goes through its GPT-2 "
                        "BPE unless --set data.tokenizer names another that fits (default: random init)")
    p.set_defaults(fn=cmd_train)

    p = verb("sample", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a training output folder")
    p.add_argument("--prompt", default=None, help="text to continue (default: a newline, or NEW for synthetic)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples to print")
    p.add_argument("--temperature", type=float, default=0.8, help="divides the logits; 0 is greedy decoding")
    p.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens only")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed (sample i uses seed + i)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.set_defaults(fn=cmd_sample)

    _add_eval(verb)
    p = verb("export", help="write a checkpoint as a Hugging Face model folder (softmax: a plain GPT-2)")
    p.add_argument("--checkpoint", required=True, help="a training output folder (or its best/)")
    p.add_argument("--hf", required=True, metavar="OUT", help="the folder to write (absent or empty)")
    p.add_argument("--force", action="store_true", help="replace the model already in OUT")
    p.add_argument("--dtype", default="float32", help="weights' dtype: float32, bfloat16 or float16")
    p.set_defaults(fn=cmd_export)

    _add_study(verb)
    p = verb("report", help="rebuild a study's report from its results")
    p.add_argument("dir", help="study folder")
    p.set_defaults(fn=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    try:
        code = int(args.fn(args) or 0)
    except QuietError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message
        print(f"quietgpt {args.verb}: error: {msg}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as e:
        detail = " ".join(str(e).split())  # the study says how many runs finished and how to resume
        print(f"quietgpt {args.verb}: interrupted" + (f"; {detail}" if detail else ""), file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # the reader closed the pipe: say nothing more, and keep Python's exit-time flush from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun the process group is already destroyed and every file is written and synced;
        # the C++ static destructors of gloo's threads can still abort a rank at interpreter shutdown
        # ("terminate called without an active exception", exit -6), failing a finished job. Skip them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
