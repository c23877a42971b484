"""Fine-tune a LLaMA with L3M (or SFT, the minimax-Lagrangian baseline, or a reward model). One file.

    python train.py                                      # the CPU demo: L3M, length band
    torchrun --standalone --nproc_per_node=2 train.py    # two CPU processes (gloo)

    # 8 GPUs, LLaMA-7B, the paper's length band (App. A; top-k 50 as transformers samples)
    torchrun --standalone --nproc_per_node=8 train.py --init=ckpt/llama-7b \\
        --data=ultrachat.jsonl --batch_size=64 --micro_batch=8 --lr=1e-6 \\
        --max_len=512 --max_new_tokens=512 --top_k=50 \\
        --constraint="length>=50" --constraint="length<=100" \\
        --activation_checkpointing=True

    # a reward model on HH-RLHF (App. A.1; docs/training.md trains both)
    torchrun --standalone --nproc_per_node=8 train.py --method=reward \\
        --init=ckpt/llama-7b --data=HH_TRAIN_FILES --data_test=HH_TEST_FILES \\
        --epochs=2 --batch_size=64 --micro_batch=8 --lr=1e-6 --warmup=0.1 \\
        --max_len=2024 --eval_every=0.1 --activation_checkpointing=True \\
        --out_dir=out/rm_helpful

The method comes first: the config, `run` (the loop), then its steps: `task_step`
(heads), `constraint_step` (tails: Eq. 11 with Eq. 12) and `reward_step` (App. A.1).
The harness follows one divider below, in six sections: set-up; flags; ranks and
FSDP2; the ledger, evaluation and reports; checkpoints and resume; the demo base model
and `main`. It stays in this file so that `torchrun train.py` is the one command and
one file holds a whole run.
`python train.py --help` explains every flag.

Choices the paper leaves open:
- "One epoch": the coin gives half the steps to the task, so a constrained run takes
  2 × (task batches per epoch) steps. Task and prompt batches come from two
  independent streams over the training split.
- The coin is a function of (seed, step), a row's sampling noise of
  (seed, step, global row): every rank flips the same coin, a response does not
  depend on how rows are split over ranks, and a resume needs no RNG state.
- Rollouts, evaluation and reward scoring run on weights gathered once (one copy
  per rank, 14 GB at 7B), not sharded in lock-step (an all-gather per block and
  token): no collective in the decode loop, so ranks may stop at different steps.
- One learning-rate schedule (linear warm-up, cosine to 0) and one AdamW state for
  both kinds of step; weight decay on the matrices only (transformers' Trainer).
  Sampling: top-p 0.9 alone (App. A); --top_k=50 adds transformers' top-k.
- A constraint step samples --rollout_batch prompts (default: --batch_size), one
  rollout each; the paper uses one mini-batch size for both kinds of step.
- --steps counts steps of both kinds: an L3M run of as many steps as an SFT run
  takes about half its task steps (smollm2.sh gives L3M more steps for that reason).
- --constraint_every=K (default 0: the coin) departs from §5.4: a constraint step every
  K-th step, task steps between. In a run of tens of steps the coin's count of each
  kind is itself a draw, and K = 3 gives the task two steps in three (smollm2.sh's
  short set: docs/real_models.md).
- --margin=δ_i (default 0, the paper) aims the constraint steps at C_i ≤ −δ_i while
  evaluations judge C_i ≤ 0: the barrier leaves an active constraint at its boundary,
  where a held-out split lands on either side of it half the time.
- Reward models (App. A.1) train in the same loop, with `reward_step` as their one
  kind of step: the optimiser, schedule, clipping, checkpoints and resume that a
  second loop would only repeat.
"""
import contextlib
import datetime
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import l3m
import rewards
from model import (CheckpointError, CompiledDecode, ModelArgs, Transformer, atomic_folder,
                   check_state_dict, decode_one_token, find_tokenizer, generate, load_tokenizer,
                   read_checkpoint, save_checkpoint)


def flag(default, help: str):
    """A Config field with the help text that `python train.py --help` prints.
    Each Config gets its own copy of a list default."""
    def make():
        if isinstance(default, list):
            return list(default)
        return default

    return field(default_factory=make, metadata={"help": help})


@dataclass
class Config:
    # what to train, on what
    method: str = flag("l3m", "sft (task steps) | l3m (the paper) | mm (minimax) | reward (App. A.1)")
    out_dir: str = flag("out/l3m", "where checkpoints, ledger.jsonl and report.json go")
    init: str = flag("demo", "a folder of `model.py convert` | scratch | demo (the demo base, cached)")
    data_dir: str = flag("out", "where the demo data, its tokenizer and base model are cached")
    data: str = flag("demo", "demo | UltraChat JSONL(.gz) or chatterbot-corpus YAML files or "
                     "folders (HH-RLHF JSONL for --method=reward), comma-separated")
    data_test: str = flag("", "HH-RLHF test file(s) for --method=reward (demo data: the demo's)")
    demo_reward: str = flag("informative", "the demo preferences of --method=reward: "
                            "informative | cautious")
    constraint: list = flag(["length>=20", "length<=35"], "E[r] >= b and the like (rewards.py); "
                            "repeat the flag")
    margin: list = flag([], "δ_i ≥ 0, once per --constraint in order: the constraint steps aim "
                        "at C_i ≤ −δ_i (in c's units), evaluations judge C_i ≤ 0; repeat")
    reward_model: list = flag([], "NAME=FOLDER: a learned reward a constraint may name; repeat")
    val: float = flag(200.0, "validation examples (a count, or a fraction if < 1)")
    test: float = flag(200.0, "test examples (a count, or a fraction if < 1)")
    max_len: int = flag(512, "drop (prompt, response) pairs over this many tokens (App. A: 512)")
    chat_template: str = flag("plain", "plain (Human: … Assistant:, the demo's) | llama2 "
                              "([INST] … [/INST]) | chatml (<|im_start|>, <|im_end|>)")
    system_prompt: str = flag("", "llama2, chatml: a system prompt opening every dialogue")

    # the demo base model's pretraining, and a model's shape (--init=scratch)
    base_epochs: float = flag(3.0, "epochs of the demo base model's pretraining")
    base_lr: float = flag(3e-3, "learning rate of the demo base model's pretraining")
    dim: int = flag(128, "model width (--init=scratch)")
    n_layers: int = flag(4, "transformer blocks (--init=scratch)")
    n_heads: int = flag(4, "attention heads (--init=scratch)")
    n_kv_heads: int = flag(2, "key/value heads, grouped-query attention (--init=scratch)")

    # optimisation (App. A); the defaults are the CPU demo's
    epochs: float = flag(1.0, "passes over the task data (App. A: 1)")
    steps: int = flag(0, "> 0: this many steps, overriding --epochs")
    batch_size: int = flag(16, "global mini-batch, by accumulating micro-batches (App. A: 64)")
    micro_batch: int = flag(16, "rows per rank and forward")
    lr: float = flag(2e-4, "peak learning rate of AdamW (App. A: 1e-6 at 7B)")
    weight_decay: float = flag(0.1, "AdamW weight decay of the matrices, none on norms (App. A)")
    warmup: float = flag(0.05, "linear warm-up, a share of the steps, then cosine to 0 (App. A)")
    grad_clip: float = flag(1.0, "gradient-norm clip of each kind of step on its own (§5.4)")

    # L3M (§5)
    mu_0: float = flag(1.0, "barrier parameter µ at the first step (§5.1)")
    mu_T: float = flag(1e-6, "µ at the last step; µ decays exponentially in between (§5.1)")
    ema_alpha: float = flag(0.1, "smoothing factor α of the EMA Ĉ of each constraint (§5.4)")
    eta_lam: float = flag(0.1, "step size η_λ of the multipliers, --method=mm only")
    baseline: str = flag("none", "the constraint step's REINFORCE baseline: none (Eq. 12 as "
                         "written) | loo (leave-one-out, scaled by length: l3m.loo_baseline)")
    rollout_batch: int = flag(0, "prompts per constraint step, one rollout each (global); 0: "
                              "--batch_size")
    constraint_every: int = flag(0, "0: a fair coin picks each step's kind (§5.4); K >= 2: "
                                 "every K-th step is a constraint step, the others task steps")
    score: str = flag("mean", "what the constraint step weights by c: mean (ℓ̄, §5.4) | sum "
                      "(Σ_t log π, whose expected step is ∇C: l3m.sequence_score)")
    top_p: float = flag(0.9, "nucleus of the rollouts' sampling (App. A: 0.9)")
    top_k: int = flag(0, "> 0: top-k, then the nucleus (transformers' default: 50)")
    temperature: float = flag(1.0, "of the rollouts; 0: greedy (log-probs at temperature 1)")
    max_new_tokens: int = flag(128, "longest rollout, in tokens")
    compile: bool = flag(False, "torch.compile the rollouts' prefill and decode step (CUDA "
                         "graphs on a GPU)")
    show: int = flag(3, "sampled test responses printed before and after")
    fluency_model: str = flag("", "a model folder (the base model, say): evaluations report "
                              "the per-token NLL of the sampled answers under it (fluency)")

    # the run
    eval_every: float = flag(100.0, "validate every this many steps and the final model; "
                             "< 1: a share of an epoch; 0: never")
    eval_before: bool = flag(True, "evaluate the test split before training too")
    ckpt_every: int = flag(100, "checkpoint every this many steps; 0: the final model only")
    resume: bool = flag(False, "continue from out_dir/ckpt")
    overwrite: bool = flag(False, "replace a run already in out_dir (else it is refused)")
    stop_after: int = flag(0, "> 0: checkpoint and stop after this step (resume later)")
    seed: int = flag(0, "of the data order, the coin, the sampling and a scratch model")
    data_seed: int = flag(0, "of the demo data, the UltraChat turn kept and the split")
    device: str = flag("auto", "auto | cpu | cuda")
    threads: int = flag(0, "torch's CPU threads; 0: OMP_NUM_THREADS if set, else one per core "
                        "that other programs leave free (set_threads)")
    activation_checkpointing: bool = flag(False, "recompute block activations in backward")

    @property
    def constrained(self) -> bool:
        """L3M and MM flip the coin between task and constraint steps; SFT and reward
        models take one kind of step."""
        return self.method in ("l3m", "mm")

    @property
    def rollouts(self) -> int:
        """Responses sampled per constraint step. More of them lower the variance of the step
        and of Ĉ's batch mean (a chance constraint's batch mean moves in steps of 1/B)."""
        return self.rollout_batch or self.batch_size


def run(cfg: Config, device) -> dict:
    """One training run as configured. Returns the final report (the same on every rank)."""
    trainer = Trainer(cfg, device)
    signal.signal(signal.SIGTERM, on_sigterm)  # finish the step, checkpoint, exit
    start = 0
    if cfg.resume:
        start = load_train_state(trainer)
    open_ledger(trainer, start)
    if start == 0 and cfg.eval_before:
        report_before(trainer)

    bar = progress_bar(start, trainer.total)
    for step in bar:
        # the barrier parameter: one stochastic step per µ, from µ_0 at step 0
        # to µ_T at the last (§5.1)
        mu = l3m.mu_at(step, max(1, trainer.total - 1), cfg.mu_0, cfg.mu_T)
        # the learning rate: linear warm-up, then cosine (App. A)
        lr = lr_at(step, trainer.total, cfg)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr

        # heads a task step, tails a constraint step: the same coin on every rank (§5.4)
        threads = adapt_threads()
        t0 = time.perf_counter()
        kind = step_kind(cfg, step)
        if kind == "task":
            record = task_step(trainer)
        elif kind == "constraint":
            record = constraint_step(trainer, step, mu)
        else:
            record = reward_step(trainer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the optimizer's kernels run on after step()
        record["t_train"] = time.perf_counter() - t0 - record.get("t_sample", 0.0)
        preempted = record.pop("preempted", False)  # a SIGTERM on any rank
        log_step(trainer, bar, {"step": step, "kind": kind, "mu": mu, "lr": lr,
                                "threads": threads, **record})

        steps_done = step + 1
        if steps_done == trainer.total:
            break  # `finish` evaluates and saves what the last step made

        # validate, checkpoint, or stop after this step (a time slice)
        if trainer.eval_every and steps_done % trainer.eval_every == 0:
            validate(trainer, f"val @ {steps_done}")
        stop = steps_done == cfg.stop_after
        due = cfg.ckpt_every and steps_done % cfg.ckpt_every == 0
        if due or stop or preempted:
            save_train_state(trainer, steps_done)
        if stop:
            print0(f"stopped after step {steps_done}; continue with --resume=True")
            return trainer.reports
        if preempted:
            print0(f"SIGTERM: checkpointed after step {steps_done} in {cfg.out_dir}/ckpt; "
                   "continue with the same flags and --resume=True")
            raise SystemExit(143)

    bar.close()
    return finish(trainer)


def step_kind(cfg: Config, step: int) -> str:
    """'task' or 'constraint' by a fair coin (§5.4), or every K-th step a constraint step
    (--constraint_every=K); SFT takes only task steps, a reward model only 'reward' steps."""
    if cfg.method == "sft":
        return "task"
    if cfg.method == "reward":
        return "reward"
    if cfg.constraint_every:
        if (step + 1) % cfg.constraint_every == 0:
            return "constraint"
        return "task"
    if coin(keyed_generator(cfg.seed, COIN, step)):
        return "task"
    return "constraint"


def coin(generator) -> bool:
    """A fair coin: True (heads) a task step, False (tails) a constraint step.
    step_kind keys the generator by (seed, step) alike on every rank: all ranks
    take the same kind of step, or FSDP's collectives would not match."""
    return bool(torch.rand((), generator=generator) < 0.5)


def task_step(trainer) -> dict:
    """Heads (§5.4): one step on the task loss L(θ) = mean −ℓ̄_θ(y|x) over a task
    mini-batch (Eq. 5)."""
    batch = [trainer.train_set[i] for i in trainer.task_stream.next()]
    prompts = [e.prompt for e in batch]
    responses = [e.response for e in batch]

    loss = 0.0
    for rows, share in micro_batches(len(batch), trainer.cfg.micro_batch):
        # one reduce-scatter, after the last micro-batch
        gradient_sync(trainer.model, rows.stop == len(batch))
        logp = packed_logp(trainer, prompts[rows], responses[rows])  # ℓ̄_θ(y|x), (b,)
        part = share * l3m.task_loss(logp)
        part.backward()
        loss = loss + part.detach().double()  # read once, in clip_and_step

    # clip the task gradient on its own (§5.4), then AdamW
    record = clip_and_step(trainer, loss)
    # this rank's tokens, padding left out (MFU)
    record["tokens"] = sum(len(e.prompt) + len(e.response) for e in batch)
    return record


def constraint_step(trainer, step: int, mu: float) -> dict:
    """Tails (§5.4): one step along −Σ_i λ̂_i·∇C_i, the constraint part of ∇G_µ (Eq. 11)."""
    cfg = trainer.cfg
    t0 = time.perf_counter()

    # x: this rank's prompts; y ~ π_θ(·|x) with top-p (App. A), on gathered weights.
    # The rows' global indices key their sampling noise.
    rows = trainer.prompt_stream.next()
    prompts = [trainer.train_set[i].prompt.tolist() for i in rows]
    generators = row_generators(cfg.seed, step, rows)
    with gathered(trainer.model) as (policy,):
        samples = rollout(policy, trainer.tok, prompts, cfg, generators, trainer.decode_step)

    # c_i = b_i − r_i(y|x), per sample and constraint (Eq. 5), plus the margin δ_i: a
    # threshold tightened by δ_i, so that C_i lands inside it where the split drifts
    with gathered(*trainer.reward_models):
        c = rewards.costs(trainer.constraints, samples) + trainer.margin
    c = c.to(trainer.device)  # (B, k)

    # Ĉ_i ← (1 − α)·Ĉ_i + α·(mean of c_i over the global batch), one all-reduce (§5.4)
    C_hat = trainer.mult.observe(c, all_reduce_sum)  # (k,)
    stats = rollout_stats(samples, c)
    if C_hat is None:
        # a non-finite reward on some rank: every rank skips the step, Ĉ and λ untouched
        return {"loss": math.nan, "grad_norm": math.nan, "skipped": True, **stats}

    # λ̂_i = µ / (k·max(−Ĉ_i, µ²)) = B'_{µ,µ²}(Ĉ_i)/k (§5.2); MM: its learned λ_i
    lam = trainer.mult.lam(mu).to(trainer.device)  # (k,) float32, detached
    t_sample = time.perf_counter() - t0

    # The surrogate Σ_i λ̂_i·mean_b(c_bi·ℓ̄_θ(y_b)), with c and λ̂ held constant:
    #   its gradient estimates Σ_i λ̂_i·∇C_i (Eq. 12), ∇ℓ̄_θ for ∇log π_θ (§5.4)
    responses = samples.responses
    n = torch.tensor([len(y) for y in responses], device=trainer.device)  # |y|, EOS included
    if cfg.baseline == "loo":
        # c_b − count_b·β_b, count = what the score is normalised by (|y| for ℓ̄, 1 for
        # --score=sum), β_b from the other rows of the global batch (l3m.loo_baseline)
        counts = n if cfg.score == "mean" else torch.ones_like(n)
        c = global_batch(l3m.loo_baseline, c, counts)
    loss = 0.0
    for rows, share in micro_batches(len(responses), cfg.micro_batch):
        gradient_sync(trainer.model, rows.stop == len(responses))
        logp = packed_logp(trainer, prompts[rows], responses[rows], cfg.temperature or 1.0)
        score = l3m.sequence_score(logp, n[rows], cfg.score)  # ℓ̄, or Σ_t log π
        part = share * l3m.reinforce_surrogate(score, c[rows], lam)
        part.backward()
        loss = loss + part.detach().double()  # read once, in clip_and_step

    # clip the constraint gradient on its own (§5.4), then AdamW
    record = clip_and_step(trainer, loss)
    record.update(constraint_record(trainer.mult, C_hat, lam, mu))
    record["t_sample"] = t_sample
    record.update(stats)
    return record


def constraint_record(mult, C_hat, lam, mu: float) -> dict:
    """A constraint step in the ledger: the batch mean of c, Ĉ, λ̂, the barrier
    B_{µ,µ²}(Ĉ_i) (Eq. 9) and which of its branches Ĉ_i is on."""
    return {
        "C": mult.ema.batch_mean.tolist(),
        "C_hat": C_hat.tolist(),
        "lam": lam.tolist(),
        "barrier": l3m.barrier(C_hat, mu, l3m.barrier_s(mu)).tolist(),
        "branch": l3m.barrier_branch(C_hat, mu),
    }


def reward_step(trainer) -> dict:
    """App. A.1: one step on the Bradley–Terry loss −log σ(r_φ(y⁺|x) − r_φ(y⁻|x)),
    with r_φ = ℓ̄_φ."""
    batch = [trainer.train_set[i] for i in trainer.task_stream.next()]
    pad_id = trainer.tok.eos_id

    loss = 0.0
    for rows, share in micro_batches(len(batch), trainer.cfg.micro_batch):
        gradient_sync(trainer.model, rows.stop == len(batch))
        chosen, rejected = rewards.preference_rewards(trainer.model, batch[rows], pad_id=pad_id)
        part = share * rewards.bradley_terry_loss(chosen, rejected)
        part.backward()
        loss = loss + part.detach().double()  # read once, in clip_and_step
    return clip_and_step(trainer, loss)


def packed_logp(trainer, prompts, responses, temperature=1.0, model=None):
    """ℓ̄_θ(y|x) (b,) of responses to prompts, in one forward of them packed into one row
    (data.packed_batch): no compute on padding. model: the policy by default."""
    tokens, mask, segments = data.packed_batch(prompts, responses)
    tokens, mask, segments = (t.to(trainer.device) for t in (tokens, mask, segments))
    logits = (model or trainer.model)(tokens, segments=segments)
    return l3m.logp_norm(logits, tokens, mask, temperature, segments)


def micro_batches(n: int, micro: int) -> list:
    """(slice, share) per micro-batch of a local batch of n rows: the shares weight
    micro-batch means into the batch mean. Every rank holds n rows, so FSDP's gradient
    average makes it the global batch mean."""
    parts = []
    for start in range(0, n, micro):
        stop = min(start + micro, n)
        parts.append((slice(start, stop), (stop - start) / n))
    return parts


def clip_and_step(trainer, loss: torch.Tensor) -> dict:
    """Clip the accumulated gradient at --grad_clip (§5.4), take the AdamW step, clear
    the gradient. loss: this rank's, a float64 scalar on the device. Loss and norm are
    all-reduced, so a non-finite one on any rank skips the step on every rank. The
    loss's all-reduce also carries whether a rank has received SIGTERM, so that all
    ranks stop after the same step. The host reads the device once, here."""
    norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.cfg.grad_clip)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    sigterm = torch.zeros_like(loss).fill_(_SIGTERM.is_set())  # a kernel, not a copy
    loss, sigterms = all_reduce_sum(torch.stack([loss, sigterm])).unbind()
    loss, sigterms, norm = torch.stack([loss, sigterms, norm.double()]).tolist()
    loss /= dist.get_world_size()

    skipped = not (math.isfinite(loss) and math.isfinite(norm))  # norm: before clipping
    if not skipped:
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": norm, "skipped": skipped, "preempted": sigterms > 0}


def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warm-up over cfg.warmup of the steps, then cosine decay to 0 (App. A)."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    angle = math.pi * (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1 + math.cos(angle))


def rollout(model, tok, prompts, cfg: Config, generators, step=decode_one_token):
    """Sample responses with top-p (App. A); call inside `gathered(model)`.
    step: the decode step (Trainer.decode_step)."""
    stop = data.stop_id(tok, cfg.chat_template)
    responses, ended = generate(model, prompts, cfg.max_new_tokens, stop, cfg.temperature,
                                cfg.top_p, generators, cfg.top_k, step)
    return rewards.Samples.from_generate(prompts, responses, ended, tok)


def steps_per_epoch(cfg: Config, task_batches: int) -> int:
    """"One epoch" (the paper leaves it open): every task batch once. L3M and MM give
    half their steps to the task (the coin), so their epoch has twice the steps; with
    --constraint_every=K, K − 1 of every K steps."""
    if not cfg.constrained:
        return task_batches
    if cfg.constraint_every:
        return math.ceil(task_batches * cfg.constraint_every / (cfg.constraint_every - 1))
    return 2 * task_batches


def multipliers(cfg: Config, k: int):
    """Ĉ and λ̂ of the k constraints: L3M's from the barrier (§5.2), MM's learned by
    gradient ascent (§6.1); None for SFT and reward models."""
    if cfg.method == "l3m":
        return l3m.Multipliers(k, "l3m", alpha=cfg.ema_alpha)
    if cfg.method == "mm":
        return l3m.Multipliers(k, "mm", cfg.eta_lam, cfg.ema_alpha)
    return None


def row_generators(seed: int, step: int, rows, evaluation: bool = False) -> list:
    """One generator per row, keyed by (seed, step, the row's global index): ranks
    sample independently. Evaluations reuse the same keys every time, so before and
    after share their sampling noise."""
    return [keyed_generator(seed, EVALUATION if evaluation else ROLLOUT, step, i) for i in rows]


# what a generator's key draws for, its second part: streams of one seed never meet
ROLLOUT, EVALUATION, COIN = 0, 1, 2


def keyed_generator(*key: int) -> torch.Generator:
    """A generator seeded by a hash of the integers `key` (numpy's SeedSequence): two
    keys that differ anywhere give independent streams, where a seed computed as, say,
    seed·p + step can collide across seeds."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


# ------------------------------------------------------------------------------------
# The harness: set-up, flags, FSDP2, evaluation and reports, checkpoints, the demo base.
# ------------------------------------------------------------------------------------


# ----- set-up: what a run builds once -----------------------------------------------


class Trainer:
    """Everything the steps share, built once: tokenizer, sharded model, constraints,
    data streams, schedule, multipliers and AdamW."""

    def __init__(self, cfg: Config, device):
        world = dist.get_world_size()
        if cfg.batch_size % world:
            raise ConfigError(f"--batch_size={cfg.batch_size} does not split over {world} ranks")
        if cfg.rollouts % world:
            raise ConfigError(f"--rollout_batch={cfg.rollouts} does not split over {world} ranks")
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.device = device

        # the tokenizer and the policy, sharded
        if cfg.init == "scratch":
            self.tok_path = str(data.prepare_demo(cfg.data_dir, cfg.data_seed).tokenizer)
        else:
            self.tok_path = find_tokenizer(cfg.init)
        self.tok = load_tokenizer(self.tok_path)
        data.stop_id(self.tok, cfg.chat_template)  # ChatML: the tokenizer must have its markers
        self.model, self.args = build_model(cfg, device, cfg.init, self.tok.vocab_size)
        self.decode_step = compiled_decode(cfg, device)

        # the k constraints, and the learned reward models they may name
        self.constraints, self.reward_models = load_constraints(cfg, device, self.tok)
        # δ_i: what the constraint steps add to c_i, so that they aim at C_i ≤ −δ_i
        self.margin = torch.tensor([float(m) for m in cfg.margin] or [0.0] * len(self.constraints))
        self.fluency_model = []  # the judge of the answers' fluency, if any
        if cfg.fluency_model:
            judge, _ = build_model(cfg, device, cfg.fluency_model, self.tok.vocab_size, train=False)
            self.fluency_model = [judge]

        # task batches (heads) and prompt batches (tails): two streams over the train split
        self.train_set, self.val_set, self.test_set = load_data(cfg, self.tok)
        per_rank = cfg.batch_size // world
        n = len(self.train_set)
        self.task_stream = data.Stream(n, per_rank, cfg.seed, rank(), world)
        self.prompt_stream = data.Stream(n, cfg.rollouts // world, cfg.seed + 1, rank(), world)

        # the number of steps, and how often to validate
        per_epoch = steps_per_epoch(cfg, self.task_stream.per_epoch)
        self.total = cfg.steps or max(1, round(cfg.epochs * per_epoch))
        if cfg.eval_every >= 1:
            self.eval_every = round(cfg.eval_every)
        else:
            self.eval_every = math.ceil(cfg.eval_every * per_epoch)

        # Ĉ and λ̂ (MM: λ) of the constraints
        self.mult = multipliers(cfg, len(self.constraints))
        if cfg.method == "l3m":
            warn_if_schedule_too_short(cfg, self.total, len(self.constraints))

        # fused: one kernel over all parameters; on the CPU the step takes 1/5 of the
        # per-tensor loop's time (SmolLM2-135M, docs/performance.md)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           fused=True)
        self.ledger = os.path.join(cfg.out_dir, "ledger.jsonl")
        self.reports = {}  # the evaluations so far
        self.best = None  # a reward model's best validation accuracy
        os.makedirs(cfg.out_dir, exist_ok=True)
        print0(f"config: {json.dumps(asdict(cfg))}\nmodel: {self.args}")
        print0(f"{self.total} steps, {n} train / {len(self.val_set)} val / "
               f"{len(self.test_set)} test, global batch {cfg.batch_size} = "
               f"{world} rank(s) × {per_rank}")


def load_data(cfg: Config, tok) -> tuple:
    """(train, val, test): UltraChat-style task pairs, or HH-style preference pairs for
    --method=reward."""
    demo = None
    if cfg.data == "demo":
        demo = data.prepare_demo(cfg.data_dir, cfg.data_seed)
    reading = {"max_tokens": cfg.max_len, "template": cfg.chat_template,
               "system": cfg.system_prompt}

    if cfg.method != "reward":
        paths = cfg.data.split(",")
        if demo:
            paths = [demo.task]
        read = data.read_task(paths, tok, seed=cfg.data_seed, **reading)
        print0(read)
        return data.split_dataset(read.examples, val=cfg.val, test=cfg.test, seed=cfg.data_seed)

    train_paths = cfg.data.split(",")
    test_paths = [p for p in cfg.data_test.split(",") if p]
    if demo:
        train_paths = [getattr(demo, f"{cfg.demo_reward}_train")]
        test_paths = [getattr(demo, f"{cfg.demo_reward}_test")]
    read = data.read_hh(train_paths, tok, **reading)
    print0(read)
    # App. A.1: 5 % held out for validation
    train, val, _ = data.split_dataset(read.examples, val=0.05, test=0, seed=cfg.data_seed)
    test = []
    if test_paths:
        test = data.read_hh(test_paths, tok, **reading).examples
    return train, val, test


def compiled_decode(cfg: Config, device):
    """The rollouts' decode step, model.decode_one_token, compiled with --compile
    (model.CompiledDecode), sampling and prefill included: its shapes are the same at
    every token, so it is traced once, and on a GPU replayed as CUDA graphs."""
    if not cfg.compile:
        return decode_one_token
    mode = None
    if device.type == "cuda":
        mode = "reduce-overhead"
    return CompiledDecode(mode)


def load_constraints(cfg: Config, device, tok) -> tuple:
    """(the k constraints, the FSDP models of the learned rewards they may name)."""
    if cfg.method == "reward":
        return [], []
    learned = {}  # name -> rewards.LearnedReward
    for spec in cfg.reward_model:
        name, _, folder = spec.partition("=")
        model, _ = build_model(cfg, device, folder, tok.vocab_size, train=False)
        learned[name] = rewards.LearnedReward(model, pad_id=tok.eos_id, micro_batch=cfg.micro_batch)
    known = {"length": rewards.length_reward, "ended_length": rewards.ended_length, **learned}
    constraints = rewards.parse_constraints(cfg.constraint, known)
    return constraints, [reward.model for reward in learned.values()]


def schedule_too_short(cfg: Config, total: int) -> bool:
    """Whether µ falls by more than ×1/1.15 per step (§5.1): 1 -> 1e-6 in fewer than
    ~100 steps."""
    return 1 / l3m.mu_decay(max(1, total - 1), cfg.mu_0, cfg.mu_T) > 1.15


def warn_if_schedule_too_short(cfg: Config, total: int, k: int):
    if not schedule_too_short(cfg, total):
        return
    # λ̂ of an active constraint (Ĉ_i = 0) at the last step: 1/(kµ_T)
    lam_T = l3m.lambda_hat(torch.zeros(max(1, k)), cfg.mu_T, max(1, k))[0].item()
    print0(f"warning: µ falls from {cfg.mu_0:g} to {cfg.mu_T:g} in {total} steps: λ̂ of "
           f"an active constraint, 1/(kµ), grows faster than Ĉ can follow it (to "
           f"{lam_T:.2g} at the end). Train for more steps (--steps, --epochs) or "
           "raise --mu_T.")


def param_groups(model, weight_decay: float) -> list:
    """AdamW's groups as transformers' Trainer makes them (App. A: its defaults): weight
    decay on the matrices, the embedding and the output layer included; none on the
    RMSNorm weights (LLaMA has no biases)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay},
            {"params": vectors, "weight_decay": 0.0}]


def set_threads(cfg: Config):
    """torch's CPU threads: --threads, else OMP_NUM_THREADS (torchrun sets 1), else one per
    core that other programs leave free, adapted before every step (CoreShare)."""
    global _CORE_SHARE
    _CORE_SHARE = None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif "OMP_NUM_THREADS" not in os.environ and os.path.exists("/proc/stat"):
        _CORE_SHARE = CoreShare(torch.get_num_threads())


class CoreShare:
    """OpenMP's threads spin while they wait, which is fast on a quiet machine, but a thread
    whose core another program holds stalls every parallel region (the demo's step ran 2-4×
    slower beside one busy core). So before each step, the CPU time that other programs took
    since the last look (Linux's /proc/stat, less this process's own) says how many cores
    they hold, and torch runs on the rest, at least one (docs/performance.md)."""

    def __init__(self, cores: int):
        self.cores = cores
        self.last = self.clocks()

    @staticmethod
    def clocks() -> tuple:
        """(wall, CPU seconds busy on the whole machine, this process's CPU seconds)."""
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
        busy = sum(ticks) - ticks[3] - ticks[4]
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def adapt(self):
        """Set torch's threads from the cores held by others since the last call; a look
        over under 0.2 s waits for the next (/proc/stat counts in 10 ms ticks)."""
        now = self.clocks()
        wall, busy, own = (a - b for a, b in zip(now, self.last))
        if wall < 0.2:
            return
        self.last = now
        held = round(max(0.0, busy - own) / wall)
        torch.set_num_threads(max(1, self.cores - held))


_CORE_SHARE = None  # set by set_threads when train.py chooses the threads


def adapt_threads() -> int:
    """CoreShare.adapt, where train.py chooses the threads; returns torch's thread count."""
    if _CORE_SHARE is not None:
        _CORE_SHARE.adapt()
    return torch.get_num_threads()


# ----- flags and their checks -------------------------------------------------------


def true_false(text: str) -> bool:
    """A bool flag's value: True or False, in any case (anything else raises a
    ValueError, which argparse reports)."""
    return ["false", "true"].index(text.lower()) == 1


def parse_config(argv) -> Config:
    """--key=value flags over Config's defaults; a list flag is repeated."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Config):
        default = f.default_factory()
        help = f"{f.metadata['help']} (default: {default})"
        if isinstance(default, list):
            parser.add_argument(f"--{f.name}", action="append", help=help)
        elif isinstance(default, bool):
            parser.add_argument(f"--{f.name}", type=true_false, default=default,
                                help="True/False: " + help)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default, help=help)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Config(**given)


class ConfigError(ValueError):
    """A flag that cannot work."""


def require(ok: bool, cfg: Config, name: str, allowed: str):
    """Raise `--name=value must be allowed` unless ok."""
    if ok:
        return
    value = getattr(cfg, name, None)
    shown = f"--{name}"
    if value is not None:
        shown += f"={value}"
    raise ConfigError(f"{shown} must be {allowed}")


def check_config(c: Config):
    """Refuse a bad config before any work, in one message (every rank checks alike:
    all stop together)."""
    require(c.method in ("sft", "l3m", "mm", "reward"), c, "method", "sft, l3m, mm or reward")
    require(c.baseline in ("none", "loo"), c, "baseline", "none or loo")
    require(c.score in ("mean", "sum"), c, "score", "mean or sum")
    require(c.constraint_every == 0 or c.constraint_every >= 2, c, "constraint_every",
            "0 (the coin) or >= 2")
    require(c.baseline == "none" or c.rollouts >= 2, c, "baseline",
            "none with one rollout per step (a leave-one-out baseline needs 2 responses)")
    require(c.rollout_batch >= 0, c, "rollout_batch", ">= 0 (0: --batch_size)")
    require(len(c.margin) in (0, len(c.constraint)), c, "margin",
            f"given once per --constraint ({len(c.constraint)} of them), or not at all")
    require(all(is_number(m) and float(m) >= 0 for m in c.margin), c, "margin",
            "a finite number >= 0 each")
    require(c.batch_size > 0, c, "batch_size", "> 0")
    require(c.micro_batch > 0, c, "micro_batch", "> 0")
    require(c.batch_size % max(c.micro_batch, 1) == 0, c, "batch_size",
            f"a multiple of --micro_batch={c.micro_batch}")
    require(c.lr > 0, c, "lr", "> 0")
    require(c.weight_decay >= 0, c, "weight_decay", ">= 0")
    require(c.steps >= 0, c, "steps", ">= 0")
    require(0 <= c.warmup < 1, c, "warmup", "in [0, 1): a share of the steps")
    require(c.grad_clip > 0, c, "grad_clip", "> 0")
    require(c.epochs > 0 or c.steps > 0, c, "epochs", "> 0 (or --steps > 0)")
    require(c.max_len > 0, c, "max_len", "> 0")
    require(c.max_new_tokens > 0, c, "max_new_tokens", "> 0")
    require(0 < c.top_p <= 1, c, "top_p", "in (0, 1]")
    require(c.top_k >= 0, c, "top_k", ">= 0 (0: no top-k)")
    require(c.temperature >= 0, c, "temperature", ">= 0 (0: greedy)")
    require(c.mu_0 > 0, c, "mu_0", "> 0")
    require(0 < c.mu_T < c.mu_0, c, "mu_T", f"in (0, --mu_0={c.mu_0}): µ decays")
    require(0 < c.ema_alpha <= 1, c, "ema_alpha", "in (0, 1]")
    require(c.eta_lam > 0, c, "eta_lam", "> 0")
    require(c.val >= 0, c, "val", ">= 0")
    require(c.test >= 0, c, "test", ">= 0")
    require(min(c.eval_every, c.ckpt_every, c.stop_after, c.show, c.threads) >= 0, c,
            "eval_every, --ckpt_every, --stop_after, --show and --threads", ">= 0")
    require(min(c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.base_epochs, c.base_lr) > 0, c,
            "dim, --n_layers, --n_heads, --n_kv_heads, --base_epochs and --base_lr", "> 0")
    require(c.device in ("auto", "cpu", "cuda"), c, "device", "auto, cpu or cuda")
    require(c.chat_template in data.TEMPLATES, c, "chat_template",
            f"one of {', '.join(data.TEMPLATES)}")
    require(not c.system_prompt or c.chat_template != "plain", c, "system_prompt",
            "empty with --chat_template=plain")

    if c.resume:
        check_resume(c)
    elif not c.overwrite and holds_run(c.out_dir):
        raise ConfigError(f"--out_dir={c.out_dir} holds a run: continue it with "
                          "--resume=True, replace it with --overwrite=True, or choose "
                          "another --out_dir")

    if c.init not in ("demo", "scratch"):
        need(os.path.join(c.init, "args.json"),
             "--init checkpoint (convert it with `python model.py convert`):")
        if not find_tokenizer(c.init):
            raise ConfigError(f"--init={c.init} has no tokenizer: copy the model's "
                              "tokenizer.model (sentencepiece) or tokenizer.json (with its "
                              "tokenizer_config.json) into the folder")
    if c.chat_template == "chatml" and c.init in ("demo", "scratch"):
        # an --init model's tokenizer is checked by data._chatml
        raise ConfigError("--chat_template=chatml needs <|im_start|> and <|im_end|> among "
                          "the tokenizer's added tokens; the demo model has none")

    if c.data != "demo":
        paths = c.data.split(",")
        if c.method == "reward":
            paths += [p for p in c.data_test.split(",") if p]
        for path in paths:
            need(path, "data file")
    for spec in c.reward_model:
        name, eq, folder = spec.partition("=")
        if not eq or not name:
            raise ConfigError(f"--reward_model={spec!r}: expected NAME=FOLDER")
        need(os.path.join(folder, "args.json"), f"--reward_model {name}:")
    if c.fluency_model:
        need(os.path.join(c.fluency_model, "args.json"), "--fluency_model checkpoint")
    # the constraints parse, and name known rewards (any reward will do for the check)
    known = {"length": rewards.length_reward, "ended_length": rewards.ended_length}
    for spec in c.reward_model:
        known[spec.partition("=")[0]] = rewards.length_reward
    rewards.parse_constraints(c.constraint, known)


def is_number(text: str) -> bool:
    """A finite float, as float() reads it."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def need(path: str, what: str):
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path!r} does not exist")


# ----- ranks and FSDP2 --------------------------------------------------------------


_COMM_DEVICE = torch.device("cpu")  # NCCL reduces CUDA tensors only, gloo CPU ones


def setup_distributed(device: str):
    """(rank, world size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a
    plain process is a world of one."""
    global _COMM_DEVICE
    if device == "auto":
        device = "cpu"
        if torch.cuda.is_available():
            device = "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))

    backend, device_id, alone = "gloo", None, {}
    if device == "cuda":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise ConfigError(f"LOCAL_RANK={local_rank}, but torch sees {gpus} GPU(s) here: "
                              "start at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        _COMM_DEVICE = torch.device("cuda", local_rank)
        backend, device_id = "nccl", _COMM_DEVICE
    if "RANK" not in os.environ:  # no torchrun
        alone = {"store": dist.HashStore(), "rank": 0, "world_size": 1}

    # One hour, not NCCL's 10 minutes: the other ranks wait at a barrier while rank 0
    # writes a 7B model's 27 GB final model.pth (save_final); a rank that truly hangs
    # is also found an hour late.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=1),
                            device_id=device_id, **alone)
    if device == "cuda":
        return rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return rank(), dist.get_world_size(), torch.device(device)


def rank() -> int:
    """This process's rank: torchrun's RANK, set before the process group exists too
    (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t over ranks, in place (also the all-reduce of l3m.ConstraintEMA); returns t."""
    x = t.to(_COMM_DEVICE)
    dist.all_reduce(x)
    if x is not t:
        t.copy_(x)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank, in rank order; on the CPU."""
    x = t.to(_COMM_DEVICE).contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out).cpu()


def global_batch(fn, *columns: torch.Tensor) -> torch.Tensor:
    """fn(*columns) over the global batch, whose rows the ranks hold in rank order: this
    rank's rows of its result, on the first column's device. Columns go as float32."""
    n = len(columns[0])
    wide = [col.reshape(n, -1).float() for col in columns]
    table = all_gather_cat(torch.cat(wide, 1)).split([w.shape[1] for w in wide], 1)
    out = fn(*(part.reshape(-1, *col.shape[1:]) for part, col in zip(table, columns)))
    return out[rank() * n:(rank() + 1) * n].to(columns[0].device)


def build_model(cfg: Config, device, init: str, tokenizer_vocab: int, train: bool = True,
                shard: bool = None):
    """Our checkpoint folder (or 'scratch') -> a model on device, weights loaded strictly:
    sharded with FSDP2 over the ranks (shard=None: where there are two or more), plain on
    one rank. Returns (model, ModelArgs)."""
    if init == "scratch":
        args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                         n_kv_heads=cfg.n_kv_heads, vocab_size=tokenizer_vocab, multiple_of=32,
                         max_seq_len=cfg.max_len + cfg.max_new_tokens)
        sd = Transformer(args).init_weights(cfg.seed).state_dict()
    else:
        args, sd = read_checkpoint(init)
        if args.vocab_size != tokenizer_vocab:
            raise CheckpointError(f"{init}: vocab_size={args.vocab_size} but the tokenizer "
                                  f"has {tokenizer_vocab}")
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(sd, model, init)
    if train and cfg.activation_checkpointing:
        for block in model.layers:
            block.forward = checkpointed(block.forward)

    # fp32 weights; bf16 compute on a GPU (FSDP2's policy, or autocast on one rank)
    if shard is None:
        shard = dist.get_world_size() > 1
    if shard:
        # FSDP2: shard each block, then the root (embedding, final norm, output), over all
        # ranks of a mesh on the device; fp32 masters and reductions
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype(device), reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        # the root keeps its weights after forward: backward needs them at once
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    elif device.type == "cuda":
        model.forward = torch.autocast("cuda", dtype=torch.bfloat16)(model.forward)

    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, sd, options=options)
    return model.train(train), args


def compute_dtype(device) -> torch.dtype:
    """bf16 on a GPU; float32 on a CPU, where bf16 matmuls are ~27× slower."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.float32


def gradient_sync(model, on: bool):
    """FSDP2: reduce-scatter the gradients in this backward (the step's last micro-batch),
    or sum them unsharded in place until then. A plain model has nothing to sync."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(on)


def checkpointed(forward):
    """A block's forward that recomputes its activations in the backward pass."""
    def forward_with_checkpoint(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return forward_with_checkpoint


@contextlib.contextmanager
def gathered(*models):
    """All-gather every shard once and keep the full weights for a stretch of no-grad
    forwards; yields one `bare` view per model. Inside, forwards run no collective, so
    ranks may run different numbers of them (rollouts that stop early). On exit each
    unit gets back the setting build_model gave it (blocks reshard after forward, the
    root does not) and is resharded."""
    units = []  # (FSDP unit, whether it reshards after forward)
    for model in models:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                units.append((m, m is not model))
    for m, _ in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        with torch.no_grad():
            yield [bare(model) for model in models]
    finally:
        for m, reshard in units:
            m.set_reshard_after_forward(reshard, recurse=False)
            m.reshard()


def bare(model) -> Transformer:
    """A plain Transformer on a model's weights inside `gathered`: an FSDP model's
    unsharded weights, or a plain model's in the compute dtype (one rank on a GPU: a bf16
    copy of its fp32 weights, as FSDP2's all-gather gives them).

    Rollouts decode on it: through the model, every token would run each block's FSDP
    hooks and, with --activation_checkpointing, checkpoint() (which saves the RNG state
    even under no_grad): host work per layer and token. It is built on the meta device
    and assigned the weights (the same tensors where no cast is needed); torch.compile
    traces it once, not once per instance."""
    with torch.device("meta"):
        plain = Transformer(model.args)
    dtype = compute_dtype(next(model.parameters()).device)
    weights = {name: p.to(dtype) for name, p in model.named_parameters()}
    plain.load_state_dict(weights, strict=True, assign=True)
    return plain.eval()


# ----- the ledger, evaluation and reports -------------------------------------------


def progress_bar(start: int, total: int):
    return tqdm(range(start, total), initial=start, total=total, disable=rank() != 0,
                dynamic_ncols=True)


def rollout_stats(samples, c: torch.Tensor) -> dict:
    """Mean, p10 and p90 of the global batch's response lengths, its share cut at
    --max_new_tokens, and per constraint the mean length of the responses that violate
    it (c_i > 0; NaN if none do): a step that lowers E[c/|y|] may lengthen them."""
    lengths = rewards.length_reward(samples)  # (B,)
    cut = torch.tensor([not e for e in samples.ended], dtype=torch.float32)  # (B,)
    table = all_gather_cat(torch.cat([lengths[:, None], cut[:, None], c.cpu().float()], 1))
    lengths, cut, c = table[:, 0], table[:, 1], table[:, 2:]  # the global batch's
    p10, p90 = torch.quantile(lengths, torch.tensor([0.1, 0.9])).tolist()
    violating = [lengths[c[:, i] > 0].mean().item() for i in range(c.shape[1])]
    return {"len_mean": lengths.mean().item(), "len_p10": p10, "len_p90": p90,
            "truncated": cut.mean().item(), "len_violating": violating}


def open_ledger(trainer: Trainer, start: int):
    """The ledger keeps exactly the steps before `start`: all of a resumed run's, none
    of a new run's."""
    if rank() != 0:
        return
    kept = []
    if os.path.isfile(trainer.ledger):
        kept = Path(trainer.ledger).read_text().splitlines(keepends=True)[:start]
    Path(trainer.ledger).write_text("".join(kept))


def log_step(trainer: Trainer, bar, record: dict):
    """One ledger line per step, and the progress bar's figures."""
    if trainer.device.type == "cuda":
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
    if rank() != 0:
        return
    with open(trainer.ledger, "a") as f:
        f.write(json.dumps(record) + "\n")

    show = {"loss": f"{record['loss']:.3f}"}
    mult = trainer.mult
    if mult is not None and mult.ema.value is not None:
        show["µ"] = f"{record['mu']:.1e}"
        show["C"] = [round(x, 2) for x in mult.ema.value.tolist()]
        show["λ"] = [f"{x:.1e}" for x in mult.lam(record["mu"]).tolist()]
    if "len_mean" in record:
        show["len"] = f"{record['len_mean']:.1f}"
    bar.set_postfix(show, refresh=False)


def evaluate(trainer: Trainer, examples, split: str, model=None) -> dict:
    """Task perplexity (−ℓ̄ per sequence), rollout lengths and each constraint's mean
    reward on a split, or a reward model's pairwise accuracy. Examples are dealt
    round-robin to the ranks and padded to equal counts (the pads are dropped from the
    statistics), then gathered: exact, and alike on every rank."""
    cfg = trainer.cfg
    world = dist.get_world_size()
    per_rank = math.ceil(len(examples) / world)
    mine = [rank() + world * j for j in range(per_rank)]
    keep = all_gather_cat(torch.tensor([i < len(examples) for i in mine]))
    mine = [min(i, len(examples) - 1) for i in mine]

    # one row per example: (−ℓ̄, |y|, ended, empty, loop, fluency, c_1 … c_k), or a reward
    # model's (r(y⁺|x), r(y⁻|x))
    parts = []
    shown = []
    with gathered(model or trainer.model) as (plain,):
        for start in range(0, per_rank, cfg.micro_batch):
            adapt_threads()
            rows = mine[start:start + cfg.micro_batch]
            batch = [examples[i] for i in rows]
            if cfg.method == "reward":
                chosen, rejected = rewards.preference_rewards(plain, batch, pad_id=trainer.tok.eos_id)
                parts.append(torch.stack([chosen, rejected], 1).float().cpu())
                continue
            part, samples = evaluate_task_batch(trainer, plain, batch, rows)
            parts.append(part)
            if start == 0:
                # a few of rank 0's responses: the same prompts and sampling noise at
                # every evaluation
                shown = shown_samples(samples, cfg.show)
    table = all_gather_cat(torch.cat(parts))[keep]  # grouped by rank, which no statistic minds

    if cfg.method == "reward":
        accuracy = rewards.pairwise_accuracy(table[:, 0], table[:, 1])
        return {"split": split, "n": len(table), "accuracy": accuracy}
    return task_report(trainer, table, split, shown)


def evaluate_task_batch(trainer: Trainer, model, batch, rows) -> tuple:
    """(−ℓ̄, |y|, ended, empty, loop, fluency, c_1 … c_k) per example (b, 6 + k), and the
    sampled responses. Fluency: −ℓ̄ of the sampled answer under --fluency_model (NaN
    without one)."""
    cfg = trainer.cfg
    prompts = [e.prompt.tolist() for e in batch]
    nll = -packed_logp(trainer, prompts, [e.response for e in batch], model=model).float().cpu()

    generators = row_generators(cfg.seed, 0, rows, evaluation=True)
    samples = rollout(model, trainer.tok, prompts, cfg, generators, trainer.decode_step)
    lengths = rewards.length_reward(samples)
    ended = torch.tensor(samples.ended, dtype=torch.float32)
    empty_loop = rewards.degenerate(samples)[:, :2]  # the third column, cut, is 1 − ended
    fluency = torch.full((len(batch),), math.nan)
    with gathered(*trainer.fluency_model) as judges:
        for judge in judges:
            fluency = -packed_logp(trainer, prompts, samples.responses, model=judge).float().cpu()
    with gathered(*trainer.reward_models):
        c = rewards.costs(trainer.constraints, samples)  # (b, k)
    return torch.cat([torch.stack([nll, lengths, ended], 1), empty_loop, fluency[:, None], c],
                     1), samples


def shown_samples(samples, n: int) -> list:
    """The first n (prompt, response, length) of a batch, for the report."""
    lengths = rewards.length_reward(samples)
    triples = zip(samples.prompt_texts[:n], samples.response_texts[:n], lengths)
    return [{"prompt": p, "response": y, "length": int(m)} for p, y, m in triples]


def task_report(trainer: Trainer, table: torch.Tensor, split: str, shown: list) -> dict:
    """Statistics of an evaluation's table (n, 6 + k), as `evaluate` returns them; the
    fluency figures are None without a --fluency_model."""
    nll, lengths, ended, empty, loop, fluency = table[:, :6].T
    c = table[:, 6:]  # c_i = b_i − r_i, (n, k)
    n = len(table)

    # C_i = E[b_i − r_i] ± its standard error, and the share of prompts whose answer
    # violates the constraint, b_i − r_i > 0 (for a chance constraint, 1 − P[the event])
    C = c.mean(0).tolist()
    se = (c.std(0) / math.sqrt(len(c))).tolist()
    violated = (c > 0).float().mean(0).tolist()
    constraints = {}
    for con, C_i, se_i, v_i in zip(trainer.constraints, C, se, violated):
        constraints[con.name] = {"b": con.b, "reward_mean": con.b - C_i, "C": C_i,
                                 "se": se_i, "satisfied": C_i <= 0,
                                 "verdict": rewards.verdict(C_i, se_i), "violated_share": v_i}

    quantiles = torch.quantile(lengths, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
    names = ["length_p10", "length_q1", "length_median", "length_q3", "length_p90"]
    return {"split": split, "n": n,
            "perplexity_mean": nll.mean().item(), "perplexity_std": nll.std().item(),
            "length_mean": lengths.mean().item(),
            "length_se": (lengths.std() / math.sqrt(len(lengths))).item(),
            **dict(zip(names, quantiles)),
            "ended_share": ended.mean().item(), "empty_share": empty.mean().item(),
            "loop_share": loop.mean().item(), "cut_share": 1 - ended.mean().item(),
            **fluency_stats(fluency, lengths), "constraints": constraints, "samples": shown}


# answer lengths 1–3, 4–7, 8–15, 16–31 and 32 or more tokens (0: empty, left out)
FLUENCY_BINS = (1, 4, 8, 16, 32)


def fluency_stats(fluency: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Mean and standard error of the per-answer NLL under the judge, over all answers
    and within each length bin (FLUENCY_BINS, keyed by its first length: {n, mean, se},
    None for a bin of fewer than 2). Per-token NLL rises as answers get shorter (their
    first tokens are the least predictable), so models whose lengths differ compare
    within a bin. All None without a judge (its column is NaN): report.json stays JSON."""
    if fluency.isnan().any():
        return {"fluency_mean": None, "fluency_se": None, "fluency_by_length": None}
    by_length = {}
    for lo, hi in zip(FLUENCY_BINS, FLUENCY_BINS[1:] + (math.inf,)):
        x = fluency[(lengths >= lo) & (lengths < hi)]
        stats = None
        if len(x) >= 2:
            stats = {"n": len(x), "mean": x.mean().item(), "se": (x.std() / math.sqrt(len(x))).item()}
        by_length[str(lo)] = stats
    return {"fluency_mean": fluency.mean().item(),
            "fluency_se": (fluency.std() / math.sqrt(len(fluency))).item(),
            "fluency_by_length": by_length}


def report_before(trainer: Trainer):
    """The model before training: a reward model's validation accuracy, or the test
    split (none for a random init)."""
    if trainer.cfg.method == "reward":
        accuracy = evaluate(trainer, trainer.val_set, "val (before)")["accuracy"]
        trainer.reports["val_accuracy_before"] = accuracy
        print0(f"val accuracy before training: {accuracy:.3f}")
    elif trainer.cfg.init != "scratch":
        trainer.reports["before"] = evaluate(trainer, trainer.test_set, "test (before)")
        print0(format_report(trainer.reports["before"]))


def validate(trainer: Trainer, split: str):
    """A validation report; a reward model also keeps its best version so far (App. A.1)."""
    report = evaluate(trainer, trainer.val_set, split)
    print0(format_report(report))
    if trainer.cfg.method != "reward":
        return
    if trainer.best is None or report["accuracy"] > trainer.best:
        trainer.best = report["accuracy"]
        save_final(trainer, "best")


def finish(trainer: Trainer) -> dict:
    """The final report: the test split after training beside the one before, or a
    reward model's accuracy; then the final model."""
    cfg = trainer.cfg
    reports = trainer.reports
    if cfg.method == "reward":
        finish_reward_model(trainer)
    else:
        if trainer.eval_every and trainer.val_set:
            # the final model on the validation split too: where a setting is chosen
            # (reproduce.py), so that the test split is read once, for the chosen one
            reports["val"] = evaluate(trainer, trainer.val_set, "val (final)")
            print0(format_report(reports["val"]))
        reports["after"] = evaluate(trainer, trainer.test_set, "test (after)")
        lam_hat = None
        if trainer.mult is not None and trainer.mult.ema.value is not None:
            lam_hat = trainer.mult.lam(cfg.mu_T).tolist()
            reports["lam_hat"] = lam_hat
        if "before" in reports:
            print0(format_comparison(reports["before"], reports["after"], cfg.method, lam_hat))
        else:
            print0(format_report(reports["after"]))

    reports["bytes_per_rank"] = held_bytes(trainer)
    print0("held by each rank (FSDP2 shards, 1/world of the whole; one rank: all): "
           "{parameters:,} bytes of parameters, {optimizer:,} of AdamW state"
           .format(**reports["bytes_per_rank"]))
    save_final(trainer, "final")
    if rank() == 0:
        report = json.dumps({"config": asdict(cfg), **reports}, indent=2)
        Path(cfg.out_dir, "report.json").write_text(report)
    return reports


def finish_reward_model(trainer: Trainer):
    """A last validation, then the best model's accuracy on the test split (App. A.1)."""
    cfg = trainer.cfg
    reports = trainer.reports
    validate(trainer, "val (final)")
    reports["val_best_accuracy"] = trainer.best
    if trainer.test_set:
        folder = os.path.join(cfg.out_dir, "best")
        best, _ = build_model(cfg, trainer.device, folder, trainer.tok.vocab_size, train=False)
        test = evaluate(trainer, trainer.test_set, "test (best)", best)
        reports["test_accuracy"] = test["accuracy"]
    test_accuracy = reports.get("test_accuracy", float("nan"))
    print0(f"reward model: best val accuracy {trainer.best:.3f}, "
           f"test accuracy {test_accuracy:.3f}")


def held_bytes(trainer: Trainer) -> dict:
    """Bytes of the parameters and of the AdamW state that this rank holds (its shards
    of the DTensors); not the optimizer's scalar step counts."""
    def local(t):
        if isinstance(t, DTensor):
            return t.to_local()
        return t

    states = [v for s in trainer.optimizer.state.values() for v in s.values()]
    return {"parameters": sum(local(p).nbytes for p in trainer.model.parameters()),
            "optimizer": sum(local(v).nbytes for v in states if torch.is_tensor(v) and v.ndim > 0)}


MARK = {"satisfied": "✓", "within noise": "≈", "violated": "✗"}  # rewards.verdict


def format_comparison(before: dict, after: dict, method: str, lam_hat=None) -> str:
    """The test split before and after fine-tuning, side by side (the paper's Fig. 2
    columns), then a few sampled responses."""
    names = ["mean length (tokens)", "length quartiles", "task perplexity (−ℓ̄)",
             "ended with EOS", "empty / looped / cut answers"]
    if before["fluency_mean"] is not None:
        names.append("fluency (NLL under the judge)")
    names += [f"C = E[b − r]  {name}" for name in before["constraints"]]
    names += [f"answers violating  {name}" for name in before["constraints"]]
    title = f"test split ({before['n']} prompts)"
    lines = [f"{title:32s} {'before':>18s} {'after (' + method + ')':>18s}"]
    for name, b, a in zip(names, report_column(before), report_column(after)):
        lines.append(f"{name:32s} {b:>18s} {a:>18s}")
    if lam_hat is not None:
        values = ", ".join(f"{x:.2g}" for x in lam_hat)
        lines.append(f"{'final λ̂ (µ = µ_T)':32s} {'':>18s} {values:>18s}")

    for b, a in zip(before["samples"], after["samples"]):
        lines += ["", f"prompt: {last_user_turn(b['prompt'])}",
                  f"  before ({b['length']:3d} tokens): {b['response']}",
                  f"  after  ({a['length']:3d} tokens): {a['response']}"]
    return "\n".join(lines)


def report_column(report: dict) -> list:
    """One column of format_comparison."""
    quartiles = (f"{report['length_q1']:.0f} / {report['length_median']:.0f} / "
                 f"{report['length_q3']:.0f}")
    column = [f"{report['length_mean']:.1f}", quartiles,
              f"{report['perplexity_mean']:.3f} ± {report['perplexity_std']:.3f}",
              f"{100 * report['ended_share']:.0f}%", degenerate_cell(report)]
    if report["fluency_mean"] is not None:
        column.append(f"{report['fluency_mean']:.3f} ± {report['fluency_se']:.3f}")
    for c in report["constraints"].values():
        column.append(f"{c['C']:+.2f} ± {c['se']:.2f} {MARK[c['verdict']]}")
    for c in report["constraints"].values():
        column.append(f"{100 * c['violated_share']:.0f}%")
    return column


def degenerate_cell(report: dict) -> str:
    """The shares of empty, looped and cut answers (rewards.degenerate), in percent."""
    shares = [report[f"{kind}_share"] for kind in ("empty", "loop", "cut")]
    return " / ".join(f"{100 * x:.0f}%" for x in shares)


def last_user_turn(prompt: str) -> str:
    """A prompt's last user turn, without the chat template's markers."""
    turn = re.split(r"Human:|\[INST\]|<\|im_start\|>user", prompt)[-1]
    markers = r"Assistant:|\[/INST\]|<\|im_end\|>|<\|im_start\|>assistant"
    return re.sub(markers, "", turn).strip()


def format_report(report: dict) -> str:
    """An evaluation in a few lines: a reward model's accuracy, or the task figures and
    each constraint's mean reward against its b."""
    if "accuracy" in report:
        return f"{report['split']} ({report['n']} pairs): accuracy {report['accuracy']:.3f}"
    lines = [f"{report['split']} ({report['n']} examples): perplexity "
             f"{report['perplexity_mean']:.3f} ± {report['perplexity_std']:.3f}, length "
             f"mean {report['length_mean']:.1f} (quartiles {report['length_q1']:.0f} / "
             f"{report['length_median']:.0f} / {report['length_q3']:.0f}), ended with "
             f"EOS {100 * report['ended_share']:.0f}%"]
    for name, c in report["constraints"].items():
        lines.append(f"  {name:24s} mean reward {c['reward_mean']:9.3f} ± {c['se']:.3f}  "
                     f"b = {c['b']:9.3f}  {MARK[c['verdict']]} {c['verdict']}, "
                     f"{100 * c['violated_share']:.0f}% of answers violate it")
    return "\n".join(lines)


# ----- checkpoints, resume and preemption -------------------------------------------


def save_train_state(trainer: Trainer, steps_done: int):
    """Every rank writes its shards into rank 0's temporary folder, which then replaces
    out_dir/ckpt (model.atomic_folder)."""
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    state = {"step": steps_done,
             "task_pos": trainer.task_stream.position,
             "prompt_pos": trainer.prompt_stream.position,
             "best": trainer.best,
             "reports": trainer.reports,
             "config": asdict(trainer.cfg),
             "multipliers": None}
    if trainer.mult is not None:
        state["multipliers"] = trainer.mult.state_dict()

    ckpt = os.path.join(trainer.cfg.out_dir, "ckpt")
    if rank() == 0:
        for stale in glob.glob(f"{ckpt}.tmp*"):  # the half-written folder of a killed save
            shutil.rmtree(stale)
        renamed = atomic_folder(ckpt)
    else:
        renamed = contextlib.nullcontext()
    with renamed as tmp:
        folder = [tmp]
        dist.broadcast_object_list(folder, src=0)  # rank 0's temporary folder, for every rank
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder[0])
        if rank() == 0:
            torch.save(state, os.path.join(tmp, "state.pt"))
        dist.barrier()  # every rank's shards are on disk before rank 0 renames the folder
    dist.barrier()


def load_train_state(trainer: Trainer) -> int:
    """Restore the model, AdamW, the data positions, the multipliers and the reports;
    returns the step to continue from."""
    folder = os.path.join(trainer.cfg.out_dir, "ckpt")  # check_config made sure it is there
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    # in place, into these two dicts
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    set_state_dict(trainer.model, trainer.optimizer,
                   model_state_dict=model_sd, optim_state_dict=optim_sd)

    state = torch.load(os.path.join(folder, "state.pt"), weights_only=False)
    trainer.task_stream.position = state["task_pos"]
    trainer.prompt_stream.position = state["prompt_pos"]
    trainer.best = state["best"]
    trainer.reports = state["reports"]
    if trainer.mult is not None:
        trainer.mult.load_state_dict(state["multipliers"])
    print0(f"resumed from {folder} at step {state['step']}")
    return state["step"]


def save_final(trainer: Trainer, name: str):
    """The model in model.py's checkpoint format (model.load_model, `python model.py sample`)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(trainer.model, options=options)
    if rank() == 0:
        folder = os.path.join(trainer.cfg.out_dir, name)
        save_checkpoint(sd, folder, trainer.args, trainer.tok_path)
    dist.barrier()


def holds_run(out_dir: str) -> bool:
    return any(os.path.exists(os.path.join(out_dir, f)) for f in ("ledger.jsonl", "ckpt"))


# Flags a resumed run may change; the rest shape the run and must be the checkpoint's.
# out_dir: a run folder may be moved, then resumed.
RESUMABLE = {"out_dir", "init", "resume", "overwrite", "stop_after", "eval_every",
             "ckpt_every", "show", "device", "threads", "micro_batch", "activation_checkpointing"}


def check_resume(c: Config):
    """--resume needs a whole checkpoint, and the flags it was written with."""
    ckpt = os.path.join(c.out_dir, "ckpt")
    if not os.path.isdir(ckpt):
        old = glob.glob(f"{ckpt}.old*/state.pt")  # killed between the two renames
        if old:
            raise ConfigError(f"{ckpt} was being replaced when the run stopped; the previous "
                              f"checkpoint is whole in {os.path.dirname(old[0])}: rename it "
                              f"to {ckpt}, then resume")
    need(os.path.join(ckpt, "state.pt"), "--resume: the checkpoint")

    saved = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)["config"]
    saved = {**asdict(Config()), **saved}  # a flag added since the checkpoint: its default
    changed = []
    for k, v in asdict(c).items():
        if k not in RESUMABLE and saved[k] != v:
            changed.append(f"--{k}={v!r} (the checkpoint's: {saved[k]!r})")
    if changed:
        raise ConfigError(f"--resume with flags other than the checkpoint's: {', '.join(changed)}")


_SIGTERM = threading.Event()  # set on SIGTERM; read at the end of each step (clip_and_step)


def on_sigterm(signum, frame):
    """Preemption: the step in progress finishes, then every rank checkpoints and exits."""
    _SIGTERM.set()


# ----- the demo base model, and the entry point -------------------------------------


DEMO_BASE = "demo_base_v2"  # v2: UltraChat turns drawn by the dialogue's text


def demo_base(cfg: Config, device) -> str:
    """The demo's 'pretrained LLaMA': SFT from random weights on the demo data, run
    once and cached."""
    folder = os.path.join(cfg.data_dir, DEMO_BASE)
    if os.path.isfile(os.path.join(folder, "args.json")):
        return folder

    print0(f"pretraining the demo base model once, cached in {folder}")
    base = replace(cfg, method="sft", init="scratch", out_dir=folder + "_run",
                   epochs=cfg.base_epochs, steps=0, lr=cfg.base_lr, constraint=[],
                   reward_model=[], resume=False, overwrite=True, eval_every=0,
                   ckpt_every=0)
    run(base, device)
    if rank() == 0:
        os.rename(os.path.join(base.out_dir, "final"), folder)
    dist.barrier()
    return folder


def main(argv):
    cfg = parse_config(argv)
    try:
        check_config(cfg)
        set_threads(cfg)
        _, _, device = setup_distributed(cfg.device)
        if cfg.init == "demo":
            cfg = replace(cfg, init=demo_base(cfg, device))
        run(cfg, device)
    except (ConfigError, CheckpointError, rewards.ConstraintError, data.DataError) as e:
        print0(f"error: {e}")
        if rank() != 0:
            # every rank fails alike; torchrun stops the others when one exits, so
            # the rest wait a moment for rank 0, the one that prints, to say why
            time.sleep(3)
        raise SystemExit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_now(code: int):
    """Leave without the interpreter's teardown, all work done and files closed.
    FSDP2's DTensor caches hold the gloo process group past destroy_process_group; its
    threads then meet the teardown and kill the process with SIGABRT ("terminate called
    without an active exception"), seen on about 1 exit in 10 of a 2-rank run on a busy
    machine: a finished run would report a crash."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SystemExit as e:  # argparse's usage errors, ConfigError, a preemption
        exit_now(e.code or 0)
    exit_now(0)
