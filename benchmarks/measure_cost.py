"""What does the full `quietgpt eval` report cost, relative to a plain float evaluation?

Times, on the same model and the same validation tokens:
  fp     a plain float perplexity pass over the whole validation split (no hooks, fast attention path)
  calib  the quantization calibration alone (calib_batches forwards of the fake-quantized model)
  full   metrics.measure(...) with quant=("w8a8",): every statistic plus float and W8A8 perplexity
and reports ratio = (full - calib) / fp, the issue's budget being <= 2, and full / (fp + calib).
Each is the best of --repeats runs (the machine may be shared). The model is untrained (cost does not
depend on the weights' values) and the tokens are random, so the script needs no data or checkpoint.

    python benchmarks/measure_cost.py --json cost.json
"""

from __future__ import annotations

import argparse
import json
import time
import types

import numpy as np
import torch

from quietgpt import GPT, GPTConfig
from quietgpt.measurement.evaluate import measure
from quietgpt.measurement.perplexity import calibration_batches, eval_windows, nll_pass
from quietgpt.quant.simulated import quantized
from quietgpt.quant.spec import parse_quant
from quietgpt.utils.atomic import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the timings here")
    ap.add_argument("--attention", default="softmax1")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--val-tokens", type=int, default=100_000)
    ap.add_argument("--n-sequences", type=int, default=64)
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.block_size, vocab_size=args.vocab, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd, bias=False, attention=args.attention)).eval()
    rng = np.random.default_rng(0)
    ds = types.SimpleNamespace(train=rng.integers(0, args.vocab, 200_000).astype(np.uint16),
                               val=rng.integers(0, args.vocab, args.val_tokens).astype(np.uint16),
                               vocab_size=args.vocab)
    windows = eval_windows(len(ds.val), args.block_size)

    def t_fp() -> float:
        t = time.perf_counter()
        nll_pass(model, ds.val, windows)
        return time.perf_counter() - t

    def t_full() -> tuple[float, float, dict]:
        t = time.perf_counter()
        m = measure(model, ds, quant=("w8a8",), n_sequences=args.n_sequences, calib_batches=args.calib_batches)
        return time.perf_counter() - t, m.timings["calib_s"], m.timings

    def t_calib() -> float:
        calib = calibration_batches(ds.train, args.calib_batches, 8, args.block_size, 0, "cpu")
        t = time.perf_counter()
        with quantized(model, parse_quant("w8a8"), calib):
            pass  # the copy, its transforms, weights and calibration
        return time.perf_counter() - t

    t_fp()  # warm-up
    fp, calib, full, parts = [], [], [], None
    for _ in range(args.repeats):
        fp.append(t_fp())
        calib.append(t_calib())
        f, _, timings = t_full()
        if not full or f < min(full):
            parts = timings
        full.append(f)
    res = dict(
        model=dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size,
                   vocab=args.vocab, attention=args.attention),
        val_tokens=args.val_tokens, n_sequences=args.n_sequences, calib_batches=args.calib_batches,
        threads=torch.get_num_threads(),
        fp_s=min(fp), calib_s=min(calib), full_s=min(full), full_parts=parts,
        ratio=(min(full) - min(calib)) / min(fp), ratio_incl_calib=min(full) / (min(fp) + min(calib)),
    )
    print(json.dumps(res, indent=2))
    if args.json:
        atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
