"""The CUDA training paths, end to end: quietgpt's train() on a GPU against the same run on the CPU.

Each test trains a tiny model for a few steps (seconds) and compares metrics.jsonl row by row with a
float32 CPU run of the same seed: the same batches, the same initial weights, so any difference is
arithmetic (TF32 matmuls, bf16/fp16 autocast, fused kernels), not a different experiment. The tolerances
are far below the spread a different batch or seed makes (tens of 1e-2 on these losses), far above the
rounding each precision brings. Skipped without CUDA (conftest.py).
"""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quietgpt.config import load_config
from quietgpt.runs.checkpoint import load_model
from quietgpt.training.loop import train

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven bold wizards quietly hum".split()
    p = tmp_path_factory.mktemp("corpus") / "words.txt"
    p.write_text(" ".join(rng.choice(words) for _ in range(8000)) + "\n", encoding="utf-8")
    return p


def run(tmp_path: Path, corpus: Path, name: str, **over) -> list[dict]:
    base = {"data.source": str(corpus), "data.cache_dir": str(tmp_path / "cache"), "data.tokenizer": "char",
            "model.n_layer": 2, "model.n_head": 4, "model.n_embd": 64, "model.block_size": 64,
            "model.dropout": 0.0, "train.batch_size": 8, "train.max_iters": 8, "train.eval_interval": 4,
            "train.eval_iters": 2, "train.log_interval": 1, "train.warmup_iters": 2, "train.lr_decay_iters": 8,
            "train.learning_rate": 3e-3, "train.seed": 5, "train.out_dir": str(tmp_path / name),
            "train.always_save_checkpoint": True, "train.device": "cuda", "train.dtype": "float32"}
    train(load_config("default", {**base, **over}), progress=False)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def worst_difference(a: list[dict], b: list[dict]) -> float:
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "train_loss", "val_loss"):
            if key in ra:
                worst = max(worst, abs(ra[key] - rb[key]))
    return worst


@pytest.mark.parametrize("variant", ["softmax", "softmax1", "sink", "gated"])
def test_cuda_float32_training_matches_cpu(tmp_path, corpus, variant):
    cpu = run(tmp_path, corpus, "cpu", **{"model.attention": variant, "train.device": "cpu"})
    gpu = run(tmp_path, corpus, "gpu", **{"model.attention": variant})
    worst = worst_difference(cpu, gpu)
    print(f"{variant}: largest |CPU - CUDA fp32| loss difference {worst:.2e}")
    assert worst < 5e-3  # TF32 matmuls on the GPU
    assert cpu[-1]["val_loss"] < cpu[0]["val_loss"] - 0.1  # it learned: the comparison is not trivial
    # Weights agree in aggregate, not element by element: Adam's normalised step turns a rounding-level
    # difference in a near-zero gradient into a whole-step difference (lr = 3e-3) for that one entry.
    w_cpu = load_file(str(tmp_path / "cpu" / "model.safetensors"))
    w_gpu = load_file(str(tmp_path / "gpu" / "model.safetensors"))
    for k in w_cpu:
        rel = (w_cpu[k] - w_gpu[k]).norm() / w_cpu[k].norm()
        print(f"{k}: relative weight difference {rel:.2e}")
        assert rel < 2e-2, k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["softmax1", "softmax_n", "sink"])
def test_cuda_half_precision_runs_the_flash_lse_path(tmp_path, corpus, variant, dtype):
    """bf16 autocast (and fp16 with a GradScaler) train like fp32 and run the flash kernel's LSE path."""
    over = {"model.attention": variant, "model.softmax_n": 2.0} if variant == "softmax_n" else \
        {"model.attention": variant}
    ref = run(tmp_path, corpus, "fp32", **over)
    half = run(tmp_path, corpus, dtype, **over, **{"train.dtype": dtype})
    worst = worst_difference(ref, half)
    print(f"{variant} {dtype}: largest |fp32 - {dtype}| loss difference {worst:.2e}")
    assert worst < 5e-2
    model, _ = load_model(tmp_path / dtype, device="cuda")
    x = torch.randint(0, model.config.vocab_size, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=getattr(torch, dtype)):
        model(x)
    assert set(model.attention_paths()) == {"lse-cudnn-cuda"}  # cuDNN >= 9 on compute capability >= 8


def test_cuda_compile_matches_eager(tmp_path, corpus):
    """Compiled training (flash LSE kernel) follows eager training (cuDNN LSE kernel): both are exact
    softmax1, so only bf16 rounding separates them."""
    eager = run(tmp_path, corpus, "eager", **{"model.attention": "softmax1", "train.dtype": "bfloat16"})
    compiled = run(tmp_path, corpus, "compiled", **{"model.attention": "softmax1", "train.dtype": "bfloat16",
                                                    "train.compile": True})
    worst = worst_difference(eager, compiled)
    print(f"softmax1 bf16: largest |eager - compiled| loss difference {worst:.2e}")
    assert worst < 3e-2
