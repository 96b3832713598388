"""The `quietgpt` command line: one function per verb.

Exit codes: 0 done, 2 bad input (a one-line message naming the problem and the fix, no traceback),
1 internal error (a bug: the traceback is shown), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import QuietError

# ----------------------------------------------------------------------------- shared options


def _add_config_args(p: argparse.ArgumentParser, preset_default: str = "default") -> None:
    """The run-config options every training-like verb takes."""
    p.add_argument("--preset", default=preset_default, help="preset name (see `quietgpt presets`) or a .toml file")
    p.add_argument("--data", help="data source: synthetic, shakespeare_char, a .txt file or folder, hf:NAME")
    p.add_argument("--attention", help="attention variant: softmax, softmax1, softmax_n, sink, clipped, gated")
    p.add_argument("--seed", type=int, help="random seed (init, data order)")
    p.add_argument("--max-iters", type=int, help="training iterations")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set model.n_layer=2 (repeatable)")


def _overrides(args: argparse.Namespace) -> dict:
    """Command-line flags -> {"section.key": value} config overrides (flags win over --set)."""
    from .config import parse_assignments

    out = parse_assignments(args.set)
    for flag, key in (("data", "data.source"), ("attention", "model.attention"), ("seed", "train.seed"),
                      ("max_iters", "train.max_iters"), ("device", "train.device"), ("out", "train.out_dir")):
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- verbs


def cmd_presets(args: argparse.Namespace) -> int:
    """List the shipped presets, or print one as TOML."""
    from .config import preset_names, preset_text

    if args.name:
        print(preset_text(args.name), end="")
        return 0
    for name in preset_names():
        print(name)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenise the configured data source into the cache and say where it is."""
    from .config import load_config
    from .data import check_length, prepare

    cfg = load_config(args.preset, _overrides(args))
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
    from .config import apply_overrides, load_config
    from .train import train

    overrides = _overrides(args)
    if args.resume and args.preset is None:
        from . import checkpoint

        out = overrides.get("train.out_dir", load_config("default").train.out_dir)
        try:
            doc = checkpoint.read_config(out)
        except QuietError:  # killed before config.json was first written: the resume point has it too
            doc = checkpoint.load_train_state(out)["config"]
        cfg = apply_overrides(checkpoint.run_config_of(doc), overrides)
    else:
        cfg = load_config(args.preset or "default", overrides)
    summary = train(cfg, resume=args.resume, progress=True)
    if summary.get("world_size", 1) == 1 or os.environ.get("RANK", "0") == "0":
        print(f"val loss {summary['val_loss']:.4f} (best {summary['best_val_loss']:.4f}), "
              f"train loss {summary['train_loss']:.4f}, {summary['iters']} iters, "
              f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, {summary['wall_s']:.1f} s -> {cfg.train.out_dir}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Print --num-samples continuations of --prompt from a checkpoint (its own tokenizer)."""
    import torch

    from .checkpoint import load_model, read_config
    from .data import tokenizer_from_meta

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
    from .atomic import atomic_write_json
    from .metrics import evaluate_checkpoint, evaluate_hf
    from .quant import parse_quant_list

    quant = [q.name for q in parse_quant_list(args.quant)]  # a bad name fails before any loading
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if (args.checkpoint is None) == (args.hf is None):
        raise QuietError("pass exactly one of --checkpoint DIR (a training output folder) or --hf PATH")
    from .device import resolve_device

    kw = dict(quant=quant, device=str(resolve_device(args.device)), n_sequences=args.n_sequences,
              calib_batches=args.calib_batches, seed=args.seed, batch_size=args.batch_size)
    if args.hf is not None:
        if not args.data:
            raise QuietError("--hf needs --data SOURCE (a .txt file or folder, or hf:NAME) to evaluate on")
        result = evaluate_hf(args.hf, data=args.data, tokenizer=args.tokenizer, cache_dir=args.cache_dir, **kw)
    else:
        result = evaluate_checkpoint(args.checkpoint, data=args.data, **kw)
    atomic_write_json(args.json, result)
    ppl = result["perplexity"]
    s = result["summary"]
    print(f"perplexity fp {ppl['fp']:.4f} over {ppl['tokens']} tokens"
          + "".join(f", {q} {ppl[q]:.4f}" for q in quant))
    for key in ("weight_kurtosis_max", "block_out_kurtosis_mean", "block_out_inf_norm_max", "act_inf_norm_max",
                "unassigned_mass_mean", "first_token_mass_mean"):
        if s.get(key) is not None:
            print(f"{key} {s[key]:.4g}")
    print(f"wrote {args.json} ({result['wall_s']:.1f} s)")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Train every (variant, seed), measure, compare, write results.json/csv and the report."""
    from .config import parse_assignments
    from .study import run_study

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    results = run_study(args.out, args.preset, variants=variants, seeds=args.seeds, data=args.data,
                        device=args.device, overrides=parse_assignments(args.set), jobs=args.jobs,
                        quant=None if args.quant is None else [q for q in args.quant.split(",") if q.strip()],
                        launcher=args.launcher, force=args.force, progress=True)
    _print_study(results, args.out)
    return 0


def _print_study(results: dict, out: str) -> None:
    from .report import text_summary

    print(text_summary(results))
    print(f"report: {out}/report.md and {out}/report.html; data: {out}/results.json, {out}/results.csv")


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild results.json/csv, report.md/html and plots from the run folders, without training."""
    from .study import rebuild

    out = rebuild(args.dir)
    _print_study(out["results"], args.dir)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quietgpt",
        description="Train GPTs whose attention normaliser is a choice (softmax, softmax1, ...), measure their "
                    "outliers and 8-bit quantized perplexity, and compare them in a study with an honest report.")
    parser.add_argument("--version", action="version", version=f"quietgpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows attention paths)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("presets", help="list the shipped presets, or print one")
    p.add_argument("name", nargs="?", help="a preset name (or .toml path) to print as TOML")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("prepare", help="tokenise a data source into cached train.bin / val.bin")
    _add_config_args(p)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("train", help="train one model")
    _add_config_args(p, preset_default=None)  # None: "default", or the checkpoint's own config with --resume
    p.add_argument("--out", help="output folder (checkpoints, metrics.jsonl, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the checkpoint in --out")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a training output folder")
    p.add_argument("--prompt", default=None, help="text to continue (default: a newline, or NEW for synthetic)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("eval", help="measure kurtosis, infinity norms, abstention, perplexity, quantized perplexity")
    p.add_argument("--checkpoint", help="a training output folder")
    p.add_argument("--hf", help="a saved Hugging Face GPT-2 model folder instead of --checkpoint")
    p.add_argument("--data", help="data source (default: the checkpoint's own)")
    p.add_argument("--quant", default="w8a8", help="comma-separated quant configs, e.g. w8a8,w4a8 ('' for none)")
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", choices=["auto", "char", "byte", "gpt2"],
                   help="with --hf: how to tokenise --data (default gpt2 for GPT-2's vocabulary)")
    p.add_argument("--cache-dir", default="", help="with --hf: where to cache the tokenised data (default cache)")
    p.add_argument("--n-sequences", type=int, default=64, help="validation windows for activation statistics")
    p.add_argument("--calib-batches", type=int, default=16, help="training batches to calibrate quantization")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="picks the statistics windows and calibration batches")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("study", help="train variants over seeds, measure them, and write a report")
    p.add_argument("--preset", default="default",
                   help="study preset: default, shakespeare-char-cpu, shakespeare-char, full, gpt2-small")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--variants", help="comma-separated attention variants")
    p.add_argument("--seeds", type=int, help="number of seeds")
    p.add_argument("--data", help="data source")
    p.add_argument("--device", help="cpu, cuda, mps or auto")
    p.add_argument("--quant", help="comma-separated quantization sweep (default: the preset's, e.g. "
                   "w8a8,w6a8,w4a8; '' for none)")
    p.add_argument("--jobs", type=int,
                   help="runs at a time: a local process pool (CPU threads split between runs, one GPU per run "
                        "when there are several); default: one per CPU core on CPU, one per GPU on CUDA; "
                        "with --launcher slurm, the array's parallelism (default 1)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="where runs execute: this machine, or a SLURM job array via submitit (pip install "
                        "'quietgpt[slurm]')")
    p.add_argument("--force", action="store_true",
                   help="accept a changed config in an existing study folder: runs whose config changed are redone")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(fn=cmd_study)

    p = sub.add_parser("report", help="rebuild a study's report from its results")
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
    except KeyboardInterrupt:
        print(f"quietgpt {args.verb}: interrupted", file=sys.stderr)
        code = 130
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
