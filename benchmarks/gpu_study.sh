#!/usr/bin/env bash
# The one prepared GPU run (issues 14 and 16) for the day a GPU is lent: four parts one after another, each
# under a hard time bound (together 8 min; not yet run on a GPU), everything written under one folder.
#   study      quietgpt study on nanoGPT's baby GPT (the shakespeare-char preset, 10.7M parameters) shortened
#              to $QUIETGPT_GPU_STUDY_ITERS (1000) iterations: softmax, softmax1, sink x 3 seeds, 3 runs at a
#              time sharing the GPU (--jobs $QUIETGPT_GPU_STUDY_JOBS, 3), outliers through training every 100
#              iterations (11 points, the W8A8/W4A8 ratios at 0, 500 and 1000). Checkpoints
#              are deleted afterwards; results.json, report.md/html, plots and each run's metrics.jsonl stay.
#   attention  benchmarks/attention.py on CUDA (bf16, B=8 H=12 D=64, T = 1024 and 2048): the fast paths of
#              softmax1, softmax_n, sink, kvbias, softpick, sigmoid and outgate against SDPA (issue 16's goals).
#   train_gpu  benchmarks/train_gpu.py: compiled gpt2-small, softmax vs softmax1, tokens/s and MFU.
#   gpu_tests  the gpu-marked tests: CUDA attention paths == reference, train() on CUDA == the CPU run,
#              bf16/fp16, compiled == eager.
#
#   bash benchmarks/gpu_study.sh [OUT] [--data FILE] [--parts study,attention,train_gpu,gpu_tests] [--cpu]
#
# OUT: the first argument, else $OUT, else benchmarks/results/gpu-<date> (--cpu: a folder in $TMPDIR). --data: tiny Shakespeare; default:
# the first file found of $QUIETGPT_GPU_STUDY_DATA, shared/data/tinyshakespeare.txt and
# ../shared/data/tinyshakespeare.txt, and without one the embedded synthetic task (a GPU machine may have no
# network to download tiny Shakespeare: bring the file along and pass --data). --cpu (or QUIETGPT_GPU_STUDY_CPU=1) runs the same parts at toy size on the CPU in about a
# minute, to test this script (the study in one process, train_gpu without compiling, the gpu tests skip).
# Time bounds in seconds (defaults sum to 8 min): QUIETGPT_GPU_STUDY_TIMEOUT_STUDY (240), _ATTENTION (60),
# _TRAIN_GPU (100), _GPU_TESTS (75; they took 37 s on an H200). A part that fails or times out is recorded and
# the next one runs; a study that timed out gets a report of the runs that finished (quietgpt report).
# Writes: device.txt, study.toml (the study that ran), <part>.log, study/, attention.json, train_gpu.json,
# parts.tsv (part, status, exit code, wall s, bound s, command) and summary.json / summary.txt.
# Exit: 0 when every part is ok, 1 when one failed or timed out, 2 for bad arguments or no GPU.
set -uo pipefail  # not -e: a part that fails is recorded and the script goes on to the next one

die() { echo "gpu_study.sh: $*" >&2; exit 2; }

ALL_PARTS=study,attention,train_gpu,gpu_tests
out="" data="${QUIETGPT_GPU_STUDY_DATA:-}" parts=$ALL_PARTS cpu=${QUIETGPT_GPU_STUDY_CPU:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1 ;;
    --data) [ $# -ge 2 ] || die "--data needs a file; pass --data tinyshakespeare.txt"; data=$2; shift ;;
    --parts) [ $# -ge 2 ] || die "--parts needs a list; e.g. --parts study,attention"; parts=$2; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    -*) die "unknown option $1; use [OUT] [--data FILE] [--parts LIST] [--cpu]" ;;
    *) [ -z "$out" ] || die "one output folder only (got $out and $1)"; out=$1 ;;
  esac
  shift
done
for p in ${parts//,/ }; do
  [[ ",$ALL_PARTS," == *",$p,"* ]] || die "unknown part $p in --parts; choose from $ALL_PARTS"
done
[ -z "$data" ] || [ -f "$data" ] || die "data file $data does not exist; pass tiny Shakespeare with --data FILE"

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${out:=${OUT:-}}" ]; then  # toy CPU results must not pass for GPU ones in benchmarks/results
  if [ "$cpu" = 1 ]; then out=${TMPDIR:-/tmp}/gpu_study-cpu-$(date +%Y%m%d-%H%M%S)
  else out=$root/benchmarks/results/gpu-$(date +%Y-%m-%d); fi
fi
mkdir -p "$out" || die "cannot create the output folder $out"
out=$(cd "$out" && pwd)
[ -z "$data" ] || data=$(cd "$(dirname "$data")" && pwd)/$(basename "$data")
cd "$root" || die "cannot enter the repository root $root"
[ -n "$data" ] || for f in shared/data/tinyshakespeare.txt ../shared/data/tinyshakespeare.txt; do
  [ -f "$f" ] && { data=$(cd "$(dirname "$f")" && pwd)/$(basename "$f"); break; }
done
py=${PYTHON:-$(command -v python3 || command -v python)}
[ -n "$py" ] || die "no python3 on PATH; set PYTHON=/path/to/python"
export PYTHONUNBUFFERED=1 PYTHONPATH="$root/src:$root${PYTHONPATH:+:$PYTHONPATH}"
mode=gpu; [ "$cpu" = 1 ] && mode=cpu
t_start=$(date +%s.%N)

# ------------------------------------------------------------------ the machine (and whether it can run this)
machine=$("$py" -c "import os, platform, sys, torch, quietgpt
cuda = torch.cuda.is_available()
print('torch', torch.__version__, '|', torch.cuda.get_device_name() if cuda else 'no CUDA', '| quietgpt',
      quietgpt.__version__, '|', platform.platform(), '|', os.cpu_count(), 'CPUs')
sys.exit(0 if cuda or sys.argv[1] == 'cpu' else 3)" "$mode" 2>&1)
case $? in
  0) ;;
  3) die "no CUDA GPU visible to torch; to test this script on the CPU, add --cpu" ;;
  *) reason=${machine##*$'\n'}; die "$py cannot import torch and quietgpt${reason:+ ($reason)}; install torch first" ;;
esac
{ if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  else echo "nvidia-smi: not found"; fi
  echo "$machine"
  echo "mode: $mode; commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); data: ${data:-synthetic}"
} > "$out/device.txt"
: > "$out/parts.tsv"
echo "gpu_study.sh: $mode mode, parts $parts, writing to $out"
sed 's/^/  /' "$out/device.txt"

# run_part NAME BOUND_S CMD...: CMD under a hard time bound (TERM, then KILL 10 s later), its output in
# NAME.log, one row in parts.tsv; prints one status line (and the log's tail when it did not succeed).
run_part() {
  local name=$1 bound=$2 t0 rc status wall
  shift 2
  t0=$(date +%s.%N)
  echo "\$ $*" > "$out/$name.log"
  timeout -k 10 "$bound" "$@" >> "$out/$name.log" 2>&1
  rc=$?
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$wall" "$bound" "$*" >> "$out/parts.tsv"
  echo "  $name: $status (exit $rc) in ${wall} s (bound ${bound} s); log $name.log"
  [ "$status" = ok ] || tail -n 5 "$out/$name.log" | sed 's/^/  | /'
}
bound() { local v="QUIETGPT_GPU_STUDY_TIMEOUT_$1"; echo "${!v:-$2}"; }
wants() { [[ ",$parts," == *",$1,"* ]]; }

# ------------------------------------------------------------------ (a) the study
# study.toml: the shakespeare-char study preset (nanoGPT's baby GPT: lr 1e-3, warmup 100, batch 64 x 256, dropout
# 0.2) cut to ITERS iterations; evals of 20 batches every 250 iterations (the preset's 200 would add about half
# the training's time); the trajectory every 100 iterations, quantized every 500. The size is an estimate, not
# a measurement: nanoGPT trains this model 5000 iterations in ~3 min on an A100 (its README), evals included,
# so ~25 ms an iteration; 9 x 1000 iterations are ~4 min of A100 time, less on an H200 and when runs overlap
# each other's launch overhead. 3 runs at a time, seed-major: a study cut short by its bound still has whole
# seeds finished (and every started run's trajectory so far in its metrics.jsonl). The CPU mode shrinks
# the model and the measurement.
write_study_toml() {
  local iters=${QUIETGPT_GPU_STUDY_ITERS:-1000} what="the synthetic task"
  [ -z "$data" ] || what=$(basename "$data")
  if [ -n "$data" ]; then printf '[data]\nsource = "%s"\n' "$data"
  else printf '[data]\nsource = "synthetic"\ntokenizer = "auto"\n'; fi
  local description="gpu_study.sh: nanoGPT's baby GPT (shakespeare-char) on $what, cut to $iters iterations; softmax vs softmax1 vs sink x 3 seeds sharing one GPU"
  [ "$mode" = gpu ] || description="gpu_study.sh --cpu: the study part at toy size on the CPU"
  printf '[study]\ndescription = "%s"\nbase = "shakespeare-char"\nvariants = ["softmax", "softmax1", "sink"]\n' "$description"
  printf 'seeds = 3\nquant = ["w8a8", "w6a8", "w4a8"]\n'
  if [ "$mode" = gpu ]; then
    cat <<EOF
n_sequences = 64
calib_batches = 16
[train]
device = "cuda"
max_iters = $iters
lr_decay_iters = $iters
warmup_iters = 100
eval_interval = 250
eval_iters = 20
outlier_interval = 100
outlier_quant_every = 5
EOF
  else
    cat <<EOF
n_sequences = 8
calib_batches = 2
eval_tokens = 2048
[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 32
[train]
device = "cpu"
threads = 1
batch_size = 4
max_iters = 10
lr_decay_iters = 10
warmup_iters = 2
eval_interval = 5
eval_iters = 2
outlier_interval = 5
outlier_quant_every = 2
outlier_sequences = 4
EOF
  fi
}

if wants study; then
  write_study_toml > "$out/study.toml"
  jobs=${QUIETGPT_GPU_STUDY_JOBS:-3}
  [ "$mode" = cpu ] && jobs=1  # on the CPU one process: starting workers would cost more than the toy runs
  run_part study "$(bound STUDY 240)" "$py" -m quietgpt study --preset "$out/study.toml" --out "$out/study" \
    --jobs "$jobs"
  if [ -f "$out/study/study.json" ] && ! grep -q $'^study\tok' "$out/parts.tsv"; then
    run_part study_report 60 "$py" -m quietgpt report "$out/study"  # a report of the runs that finished
  fi
  # the checkpoints (~200 MB a run: weights, best weights, optimizer state) are not results: keep what the
  # report reads (results, eval.json, metrics.jsonl), and a killed write's temporaries go too
  [ -d "$out/study/runs" ] && find "$out/study/runs" -type f \
    \( -name '*.safetensors' -o -name 'train_state.pt' -o -name '*.tmp' \) -delete
fi

# ------------------------------------------------------------------ (b) issue 16's GPU checks
variants=softmax,softmax1,softmax_n,sink,kvbias,softpick,sigmoid,outgate
if wants attention; then
  if [ "$mode" = gpu ]; then size=(--device cuda --B 8 --H 12 --reps 10 --T 1024 --T 2048)
  else size=(--device cpu --B 1 --H 2 --D 16 --reps 2 --T 64 --T 128 --no-rss); fi
  run_part attention "$(bound ATTENTION 60)" "$py" benchmarks/attention.py "${size[@]}" --variants "$variants" \
    --json "$out/attention.json"
fi
if wants train_gpu; then
  if [ "$mode" = gpu ]; then size=(--preset gpt2-small --compile on --iters 20 --warmup 3 --rounds 5)
  else size=(--device cpu --preset default --vocab-size 64 --block-size 32 --batch-size 2 --compile off
             --iters 1 --warmup 1 --rounds 2 --peak-tflops 1.0); fi
  run_part train_gpu "$(bound TRAIN_GPU 100)" "$py" benchmarks/train_gpu.py "${size[@]}" \
    --variants softmax,softmax1 --json "$out/train_gpu.json"
fi
if wants gpu_tests; then
  run_part gpu_tests "$(bound GPU_TESTS 75)" "$py" -m pytest -q -rP --show-capture=stdout -p no:cacheprovider \
    tests/test_attention.py tests/test_data.py tests/test_gpu.py tests/test_model.py -m gpu
fi

# ------------------------------------------------------------------ summary.json and summary.txt
"$py" - "$out" "$mode" "$t_start" "$(date +%s.%N)" <<'EOF' | tee "$out/summary.txt"
import json, sys
from pathlib import Path

out, mode, t0, t1 = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])


def read(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


parts = [dict(zip(("part", "status", "rc", "wall_s", "bound_s", "command"), ln.split("\t")))
         for ln in (out / "parts.tsv").read_text().splitlines() if ln]
for p in parts:
    p.update(rc=int(p["rc"]), wall_s=float(p["wall_s"]), bound_s=float(p["bound_s"]), log=f"{p['part']}.log")
doc = {"mode": mode, "wall_s": round(t1 - t0, 1), "device": (out / "device.txt").read_text().strip(),
       "parts": parts}
print(f"gpu_study.sh ({mode}): {sum(p['status'] == 'ok' for p in parts)} of {len(parts)} parts ok "
      f"in {doc['wall_s']:.0f} s")
for p in parts:
    print(f"  {p['part']:10s} {p['status']:8s} {p['wall_s']:7.1f} s (bound {p['bound_s']:.0f} s)")
study = read("study/results.json")
if study:
    runs = study["runs"]
    keys = ["val_loss", "sink_rate", "massive_ratio_max", "act_kurtosis_mean", "ppl_ratio_w8a8", "ppl_ratio_w4a8"]
    means = {k: {v: s.get("mean") for v, s in study["summary"].get(k, {}).items()} for k in keys}
    emergence = [e["text"] for e in study.get("trajectories", {}).get("emergence", [])]
    doc["study"] = {"runs": len(runs), "ok": sum(r["status"] == "ok" for r in runs), "means": means,
                    "emergence": emergence, "wall_s": study.get("wall_s")}
    print(f"study: {doc['study']['ok']} of {len(runs)} runs ok; means over seeds:")
    for k, m in means.items():
        print(f"  {k:20s} " + "  ".join(f"{v} {x:.4g}" for v, x in m.items() if x is not None))
    print("\n".join(f"  {t}" for t in emergence))
attn = read("attention.json")
if attn:
    rows = [{k: r.get(k) for k in ("T", "variant", "path", "ratio_to_sdpa")} for r in attn["results"]
            if r.get("requested") in ("auto", "fast")]
    doc["attention"] = {"rows": rows, "goals": attn.get("goals", {})}
    print("attention fwd+bwd, time / SDPA softmax:")
    for r in rows:
        print(f"  T={r['T']:<5} {r['variant']:10s} {r['path'] or '':16s} {r['ratio_to_sdpa']:.3f}x")
train = read("train_gpu.json")
if train:
    doc["train_gpu"] = [{k: r.get(k) for k in ("variant", "compiled", "tokens_per_s", "mfu", "ratio_to_softmax")}
                        for r in train["results"]]
    print("train_gpu:")
    for r in doc["train_gpu"]:
        mfu = f"{r['mfu'] * 100:.1f}% MFU" if r["mfu"] is not None else "MFU n/a"
        print(f"  {r['variant']:9s} compiled={r['compiled']!s:5s} {r['tokens_per_s']:10.0f} tok/s  {mfu}  "
              f"x{r['ratio_to_softmax']:.3f}")
(out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
EOF
grep -qv $'\tok\t' "$out/parts.tsv" && exit 1
exit 0
