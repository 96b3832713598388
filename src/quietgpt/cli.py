"""The `quietgpt` command line: one function per verb.

Exit codes: 0 done, 2 bad input (a one-line message naming the problem and the fix, no traceback),
1 internal error (a bug: the traceback is shown), 130 interrupted.
"""

from __future__ import annotations

import argparse
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
    from .config import preset_names

    for name in preset_names():
        print(name)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    raise QuietError("`quietgpt prepare` is not implemented yet")


def cmd_train(args: argparse.Namespace) -> int:
    raise QuietError("`quietgpt train` is not implemented yet")


def cmd_sample(args: argparse.Namespace) -> int:
    raise QuietError("`quietgpt sample` is not implemented yet")


def cmd_eval(args: argparse.Namespace) -> int:
    raise QuietError("`quietgpt eval` is not implemented yet")


def cmd_study(args: argparse.Namespace) -> int:
    raise QuietError("`quietgpt study` is not implemented yet")


def cmd_report(args: argparse.Namespace) -> int:
    raise QuietError("`quietgpt report` is not implemented yet")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quietgpt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"quietgpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows attention paths)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("prepare", help="tokenise a data source into cached train.bin / val.bin")
    _add_config_args(p)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("train", help="train one model")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (checkpoints, metrics.jsonl, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the checkpoint in --out")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a training output folder")
    p.add_argument("--prompt", default="\n")
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
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("study", help="train variants over seeds, measure them, and write a report")
    p.add_argument("--preset", default="default")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--variants", help="comma-separated attention variants")
    p.add_argument("--seeds", type=int, help="number of seeds")
    p.add_argument("--data", help="data source")
    p.add_argument("--device", help="cpu, cuda, mps or auto")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local")
    p.add_argument("--force", action="store_true", help="start over in an existing folder with another config")
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
        return int(args.fn(args) or 0)
    except QuietError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message
        print(f"quietgpt {args.verb}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quietgpt {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
