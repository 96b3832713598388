"""What do the quantization methods cost? Wall time of building each configuration's quantized copy
(quant/simulated.py's `build`: the copy, the transforms, the weights, the activation calibration) at the CPU
preset's size (shakespeare-char-cpu: 4 layers, 128 wide, vocab 65, context 64) and at gpt2-small's width
(12 layers, 768 wide, vocab 50304; context and calibration cut to fit a CPU, the settings are in the JSON).

Each number is the best of --repeats builds (the machine may be shared); the models are untrained (the cost
does not depend on the weights' values) and the calibration tokens random, so the script needs no data.
The baseline row `w4a8` is round-to-nearest, so `gptq`, `rot` and `smooth` read as ratios to it.

    python benchmarks/quant_cost.py --json quant_cost.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quietgpt import GPT, GPTConfig
from quietgpt.quant.simulated import build
from quietgpt.quant.spec import parse_quant
from quietgpt.utils.atomic import atomic_write_json

CONFIGS = ("w4a8", "w4a8-gptq", "w4a8-g64-gptq-ao", "w4a8-rot", "w4a8-gptq-rot", "w8a8-smooth")
SIZES = {  # name: (model config, calibration batches, batch size, tokens per sequence)
    "cpu-preset": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False), 8, 8, 64),
    "gpt2-small-width": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True),
                         4, 4, 128),
}


def time_build(model: GPT, spec: str, calib: list[torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        build(model, parse_quant(spec), calib)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write the timings here")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the CPU preset only, one repeat (a smoke run)")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {"benchmark": "quant_cost", "torch": torch.__version__, "threads": torch.get_num_threads(), "sizes": {}}
    for name, (cfg, n_batches, batch, T) in SIZES.items():
        if args.quick and name != "cpu-preset":
            continue
        model = GPT(GPTConfig(**cfg)).eval()
        g = torch.Generator().manual_seed(1)
        calib = [torch.randint(0, cfg["vocab_size"], (batch, T), generator=g) for _ in range(n_batches)]
        times = {spec: time_build(model, spec, calib, 1 if args.quick else args.repeats) for spec in CONFIGS}
        out["sizes"][name] = {"model": cfg, "calibration": {"batches": n_batches, "batch": batch, "tokens": T},
                              "seconds": times, "ratio_to_rtn": {k: v / times["w4a8"] for k, v in times.items()}}
        print(json.dumps({name: {k: round(v, 2) for k, v in times.items()}}), flush=True)
    atomic_write_json(args.json, out)


if __name__ == "__main__":
    main()
