#!/usr/bin/env bash
# A short L3M run in bf16 with FSDP2 and activation checkpointing on a ~1B-parameter LLaMA with random
# weights (demo data and tokenizer), then step times, rollout tokens/s and peak memory from its ledger.
#   bash gpu_check.sh          # one GPU, a few minutes
#   bash gpu_check.sh tiny     # the same run on the CPU with a tiny model: checks the script itself
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = tiny ]; then
  SHAPE="--device=cpu --dim=64 --n_layers=2 --n_heads=4 --n_kv_heads=2 --max_new_tokens=16"
else
  SHAPE="--device=cuda --dim=2048 --n_layers=22 --n_heads=16 --n_kv_heads=8 --max_new_tokens=256"
fi
OUT="${OUT:-out}"
python -m torch.distributed.run --standalone --nproc_per_node=1 train.py --init=scratch $SHAPE \
  --method=l3m --steps=16 --batch_size=32 --micro_batch=16 --lr=1e-4 --val=32 --test=32 --eval_every=0 \
  --ckpt_every=0 --activation_checkpointing=True --constraint="length>=20" --constraint="length<=60" \
  --data_dir="$OUT" --out_dir="$OUT/gpu_check"
python - "$OUT/gpu_check/ledger.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])][2:]  # the first steps include warm-up
for kind in ("task", "constraint"):
    t = [r["t_train"] + r.get("t_sample", 0.0) for r in rows if r["kind"] == kind]
    if t:
        print(f"{kind:10s} steps: {len(t):2d}, median {statistics.median(t):.2f} s per step")
c = [r for r in rows if r["kind"] == "constraint"]
if c:
    tokens = sum(32 * r["len_mean"] for r in c)
    print(f"rollouts: {tokens / sum(r['t_sample'] for r in c):.0f} tokens/s (batch 32, top-p 0.9), "
          f"training share of constraint steps {sum(r['t_train'] for r in c) / sum(r['t_train'] + r['t_sample'] for r in c):.0%}")
print(f"peak memory: {max(r.get('peak_mem_gib', 0.0) for r in rows):.1f} GiB (0.0 on CPU)")
PY
