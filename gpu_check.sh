#!/usr/bin/env bash
# On one GPU, in two parts that fit a lent GPU's time (each meant for 5 minutes or less; unmeasured since the
# split): (train) a short L3M run in bf16 at the paper's batch of 64 on a ~1B-parameter LLaMA with random weights
# (demo data and tokenizer), on one rank: a plain model under autocast, no FSDP, no activation checkpointing (the
# peak memory line says what that costs): step times, task-step MFU, rollout tokens/s, peak memory;
# (decode) bench.py's rollouts alone at batch 8 and 64 (--decode_only): eager vs torch.compile'd decode step vs
# the HBM bound, the decode steps timed without the prefill, CUDA graph replays per step counted.
#   bash gpu_check.sh              # both parts, on one GPU
#   bash gpu_check.sh decode       # one part: train or decode
#   bash gpu_check.sh tiny         # the same on the CPU with a tiny model: checks the script itself
# PEAK_TFLOPS=… sets the GPU's dense bf16 peak for MFU (default: by model name); NO_COMPILE=1 skips torch.compile;
# GPU_CHECK_OUT=… the folder for its data and run (default: out).
set -euo pipefail
cd "$(dirname "$0")"
PART=all TINY=
for arg in "$@"; do
  case "$arg" in
    train|decode) PART=$arg ;;
    tiny) TINY=1 ;;
    *) echo "gpu_check.sh: unknown argument '$arg': give train or decode (default: both), and tiny for the CPU" >&2
       exit 2 ;;
  esac
done
if [ -z "$TINY" ] && ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: torch $(python -c 'import torch; print(torch.__version__)') sees no CUDA GPU (a CPU build, or" \
       "no driver); install a CUDA build of torch, or run 'bash gpu_check.sh tiny' to check the script on the CPU" >&2
  exit 1
fi
if [ -n "$TINY" ]; then
  DEVICE=cpu DTYPE=float32 NEW=16 SHAPE="--dim=64 --n_layers=2 --n_heads=4 --n_kv_heads=2"
  BENCH="--vocab_size=1000 --seq_len=32 --new_tokens=16 --repeats=1"
else
  DEVICE=cuda DTYPE=bfloat16 NEW=256 SHAPE="--dim=2048 --n_layers=22 --n_heads=16 --n_kv_heads=8"
  BENCH="--vocab_size=32000 --seq_len=256 --new_tokens=128 --repeats=3"
fi
OUT="${GPU_CHECK_OUT:-out}"  # not $OUT: some job runners set it to their own folder
if [ "$PART" != decode ]; then
python -m torch.distributed.run --standalone --nproc_per_node=1 train.py --init=scratch --device=$DEVICE $SHAPE \
  --max_new_tokens=$NEW --method=l3m --steps=16 --batch_size=64 --micro_batch=16 --lr=1e-4 --val=32 --test=32 \
  --eval_every=0 --ckpt_every=0 --constraint="length>=20" --constraint="length<=60" \
  --data_dir="$OUT" --out_dir="$OUT/gpu_check" --overwrite=True
python - "$OUT/gpu_check" <<'PY'
import json, os, statistics, sys
import torch
import model as M
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/ledger.jsonl")][2:]  # the first steps include warm-up
with torch.device("meta"):
    n = sum(p.numel() for p in M.Transformer(M.ModelArgs(**json.load(open(f"{sys.argv[1]}/final/args.json")))).parameters())
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
# dense bf16 TFLOP/s by the vendors' datasheets, the more specific names first
peaks = [("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312)]
peak = 1e12 * (float(os.environ.get("PEAK_TFLOPS", 0)) or next((p for key, p in peaks if key in name), 0))
print(f"{name}: {n / 1e9:.2f}B parameters; peak for MFU {peak / 1e12:.0f} TFLOP/s (PEAK_TFLOPS=… to change)")
for kind in ("task", "constraint"):
    t = [r["t_train"] + r.get("t_sample", 0.0) for r in rows if r["kind"] == kind]
    if t:
        print(f"{kind:10s} steps: {len(t):2d}, median {statistics.median(t):.2f} s per step")
task = [r for r in rows if r["kind"] == "task"]
if task and peak:  # 6·N FLOPs per real token (no padding; attention and checkpointing's recomputation not counted)
    print(f"task-step MFU: {statistics.median(6 * n * r['tokens'] / r['t_train'] / peak for r in task):.0%}")
c = [r for r in rows if r["kind"] == "constraint"]
if c:
    tokens = sum(64 * r["len_mean"] for r in c)
    print(f"rollouts: {tokens / sum(r['t_sample'] for r in c):.0f} tokens/s (batch 64, top-p 0.9), "
          f"training share of constraint steps {sum(r['t_train'] for r in c) / sum(r['t_train'] + r['t_sample'] for r in c):.0%}")
print(f"peak memory: {max(r.get('peak_mem_gib', 0.0) for r in rows):.1f} GiB (0.0 on CPU)")
held = json.load(open(f"{sys.argv[1]}/report.json"))["bytes_per_rank"]
print(f"held by the one rank: parameters {held['parameters'] / 2**30:.2f} GiB, "
      f"AdamW state {held['optimizer'] / 2**30:.2f} GiB")
PY
fi
if [ "$PART" != train ]; then
for B in 8 64; do
  python bench.py --device=$DEVICE --dtype=$DTYPE $SHAPE $BENCH --batch=$B --logit_scales=10 --threads=2 \
    --decode_only ${NO_COMPILE:+--no_compile} | tail -7
done
fi
