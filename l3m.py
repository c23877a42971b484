"""The L3M method (Dhillon et al., ICLR 2025): relaxed log barrier, µ schedule, EMA of the constraints, Lagrange
multipliers, length-normalised log-likelihoods, the REINFORCE surrogate, and the minimax-Lagrangian baseline.

The problem (Eq. 5), with c_i = b_i − r_i(y|x):

    minimise L(θ) = E[−ℓ̄_θ(y|x)]   subject to   C_i(θ) = E_{y~π_θ}[c_i] ≤ 0,  i = 1..k

One step of the procedure (§5.1, §5.4); train.py writes it out as run, task_step and constraint_step:

    mu = mu_at(step, total_steps - 1)           # step 0 uses µ_0 = 1, the last µ_T = 1e-6
    if mult.coin(generator):                    # heads: task step
        loss = task_loss(logp_norm(model(tokens), tokens, mask))
    else:                                       # tails: constraint step on sampled y
        c = b - r                               # (B, k)
        mult.observe(c, all_reduce)             # Ĉ ← EMA over the global batch
        loss = reinforce_surrogate(logp_norm(model(tokens), tokens, mask, temperature), c, mult.lam(mu))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # each kind of step is clipped on its own
    optimizer.step(); optimizer.zero_grad()

Where this departs from the paper, or fixes what it leaves open:
- Top-p. Responses are sampled from the top-p nucleus of softmax(logits / T), but ℓ̄ is the log-likelihood under
  the full softmax(logits / T), as the paper describes. Per token log q(y_t) = log π(y_t) − log Π_t, Π_t =
  π(nucleus_t) ≥ p, so the gradient is off from the nucleus sampler's REINFORCE gradient by E_q[c·mean_t ∇log Π_t]:
  zero at p = 1, small while 1 − Π_t ≤ 1 − p is.
- Length normalisation (§5.4). E_y[c(y)·∇ℓ̄_θ(y)] = ∇_θ E_y[c(y)/|y|] (c fixed), not ∇C = ∇E_y[c(y)]: the step
  is that of a per-token constraint. Ĉ still estimates E[c], so the barrier still drives each C_i to ≤ 0.
- REINFORCE without a baseline (Eq. 12 as written); Ĉ takes in the current batch before it weights that batch's
  gradient (§5.4).
- MM baseline: on each constraint step λ_i ← max(0, λ_i + η_λ·Ĉ_i) with the fresh Ĉ (L3M's estimate), then a step
  on Σ_i λ_i·surrogate_i. No 1/k: the learned λ_i are the Lagrangian's own (Eq. 8); L3M's 1/k is inside λ̂.
"""
import math

import torch

def barrier(z, mu, s):
    """Relaxed log barrier B_{µ,s}(z) (Eq. 9), elementwise on a tensor z; µ, s > 0 (the paper: s = µ²).

        B(z) = −µ·log(−z)                 z ≤ −s
             = (µ/s)·z + µ − µ·log(s)     z > −s

    Each branch is chosen by torch.where, so autograd gives each branch's own derivative, µ/s at z = −s from both
    sides, whatever convention a torch version keeps for clamp or relu at their kinks. The log's argument is −z
    only where that branch is taken (elsewhere s), so the branch not taken has no NaN to leak into the gradient."""
    log_branch = z <= -s
    log_part = -mu * torch.log(torch.where(log_branch, -z, s))
    linear_part = (mu / s) * z + mu - mu * math.log(s)
    return torch.where(log_branch, log_part, linear_part)

def barrier_grad(z, mu, s):
    """B'_{µ,s}(z) = µ / max(−z, s) (Eq. 9): continuous, and non-decreasing (B is convex)."""
    return mu / torch.clamp(-z, min=s)

def mu_at(step, total_steps, mu_0=1.0, mu_T=1e-6):
    """µ_t = µ_0·(µ_T/µ_0)^(t/T) (§5.1: one stochastic step per µ, decayed exponentially). Exact at both ends:
    t = 0 gives µ_0 (x**0.0 == 1.0), t = T returns µ_T itself."""
    if not 0 <= step <= total_steps:
        raise ValueError(f"step {step} outside the schedule [0, {total_steps}]")
    return mu_T if step == total_steps else mu_0 * (mu_T / mu_0) ** (step / total_steps)

class ConstraintEMA:
    """Ĉ_i, the exponential moving average of the batch means of c_i = b_i − r_i (§5.4). C_i enters λ̂ without a
    gradient, so earlier batches may reduce its variance; θ moves, so they are forgotten at rate α:
        Ĉ ← mean_batch(c)  on the first batch,  Ĉ ← (1 − α)·Ĉ + α·mean_batch(c)  afterwards."""

    def __init__(self, k, alpha=0.1):
        self.k, self.alpha = k, alpha
        self.value = None  # (k,) float64 Ĉ, once a batch has been seen
        self.batch_mean = None  # (k,) float64, the last global batch mean of c

    def update(self, c, all_reduce=None):
        """Fold in one batch of per-sample c (B, k); returns Ĉ (k,), or None if the batch has a non-finite c.
        all_reduce: an optional in-place sum over ranks. It sums [Σ_b c_b, B] (k+1,): the mean is the global batch's
        even when ranks hold different numbers of samples (or none), and every rank gets the same Ĉ."""
        B, k = c.shape
        if k != self.k:
            raise ValueError(f"expected {self.k} constraints, got c of shape {tuple(c.shape)}")
        c = c.detach().double()
        stats = torch.cat([c.sum(0), c.new_tensor([B])])  # (k+1,)
        if all_reduce is not None:
            all_reduce(stats)
        if not torch.isfinite(stats).all():  # a non-finite cost on any rank makes every rank's sums non-finite:
            return None  # Ĉ stays as it was, and every rank can skip the step alike
        if stats[k] == 0:
            raise ValueError("no samples in the (global) batch: Ĉ cannot be updated")
        mean = self.batch_mean = stats[:k] / stats[k]  # (k,)
        self.value = mean if self.value is None else (1 - self.alpha) * self.value.to(mean) + self.alpha * mean
        return self.value

def lambda_hat(C_hat, mu, k):
    """λ̂_i = µ / (k·max(−Ĉ_i, µ²)) = B'_{µ,µ²}(Ĉ_i)/k (§5.2), float32 and detached. Eq. 10–11: ∇G_µ = ∇L +
    (1/k) Σ_i B'(C_i)·∇C_i = ∇L + Σ_i λ̂_i·∇C_i, the Lagrangian's gradient (Eq. 8) with λ̂ for λ. Active (Ĉ_i ≥ −µ²):
    λ̂_i = 1/(kµ), up to 10⁶/k at µ = 1e-6 (clipping tames it). Inactive (Ĉ_i < 0 fixed): λ̂_i = µ/(k·(−Ĉ_i)) → 0
    as µ → 0, complementary slackness by design."""
    return barrier_grad(C_hat.detach().double(), mu, mu**2).div(k).float()

def chance(r, b, eps):
    """P[r ≥ b] ≥ 1 − ε (§4.1) as an average constraint: returns (reward 1{r ≥ b}, threshold 1 − ε)."""
    return (r >= b).float(), 1.0 - eps

class Multipliers:
    """The multipliers of k constraints: L3M's λ̂ from the barrier (method "l3m", §5.2) or the MM baseline's λ
    by projected gradient ascent ("mm", step size eta_lam, to which MM is very sensitive; λ starts at 0). alpha:
    the EMA factor of Ĉ. Both methods take the same coin: heads a task step on L, tails a constraint step."""

    def __init__(self, k, method="l3m", eta_lam=None, alpha=0.1):
        if method not in ("l3m", "mm"):
            raise ValueError(f"method must be 'l3m' or 'mm', not {method!r}")
        if (method == "mm") != (eta_lam is not None):
            raise ValueError("eta_lam is required for method='mm' and meaningless for 'l3m'")
        self.k, self.method, self.eta_lam = k, method, eta_lam
        self.ema = ConstraintEMA(k, alpha)
        self.lam_mm = torch.zeros(k, dtype=torch.float64) if method == "mm" else None  # (k,)

    @staticmethod
    def coin(generator):
        """Fair coin: True (heads) = task step, False (tails) = constraint step. generator: a CPU torch.Generator
        seeded alike on every rank: all ranks take the same kind of step, or FSDP's collectives would not match."""
        return bool(torch.rand((), generator=generator) < 0.5)

    def observe(self, c, all_reduce=None):
        """Update Ĉ with a batch c (B, k), then MM's λ ← max(0, λ + η_λ·Ĉ); None (no update) if c is not finite."""
        C_hat = self.ema.update(c, all_reduce)
        if self.method == "mm" and C_hat is not None:
            self.lam_mm = torch.clamp(self.lam_mm.to(C_hat) + self.eta_lam * C_hat, min=0.0)
        return C_hat

    def lam(self, mu):
        """The multipliers (k,) float32 that weight the constraint step at barrier parameter µ."""
        if self.ema.value is None:
            raise RuntimeError("observe a constraint batch before asking for multipliers")
        return self.lam_mm.float() if self.method == "mm" else lambda_hat(self.ema.value, mu, self.k)

    def state_dict(self):
        """Plain Python numbers: a checkpoint holding them loads with weights_only=True."""
        tolist = lambda t: None if t is None else t.tolist()
        return {"k": self.k, "method": self.method, "eta_lam": self.eta_lam, "alpha": self.ema.alpha,
                "C_hat": tolist(self.ema.value), "lam": tolist(self.lam_mm)}

    def load_state_dict(self, state):
        state = {**state, **state.get("ema", {})}  # checkpoints written before Ĉ moved here hold it under "ema"
        if (state["k"], state["method"]) != (self.k, self.method):
            raise ValueError(f"checkpoint is for k={state['k']}, {state['method']}; "
                             f"this run is k={self.k}, {self.method}")
        self.eta_lam, self.ema.alpha = state["eta_lam"], state["alpha"]
        self.ema.value, self.lam_mm = (None if x is None else torch.tensor(x, dtype=torch.float64)
                                       for x in (state["C_hat"], state["lam"]))

def logp_norm(logits, tokens, mask, temperature=1.0):
    """ℓ̄_θ(y|x) = (1/|y|)·Σ_t log π_θ(y_t | x, y_<t) over the response tokens, (B,) float32 (float64 for float64
    logits), differentiable in logits (B, T, V) = model(tokens); logits[:, t] scores tokens[:, t+1].
    tokens (B, T): prompt + response (+ padding). mask (B, T) bool: True at the scored tokens, the response with the
    EOS that ended it (stopping is what a length constraint must learn), never prompt or padding; mask[:, 0] is
    False (nothing scores the first token). The log-probs are those of softmax(logits / temperature), as sampled."""
    if mask[:, 0].any():
        raise ValueError("mask[:, 0] must be False: no logits score the first token")
    m = mask[:, 1:]  # (B, T-1), aligned with the shifted targets
    n = m.sum(1)  # (B,) |y|, EOS included
    if (n == 0).any():
        raise ValueError(f"rows {torch.nonzero(n == 0).flatten().tolist()} have an empty response mask")
    z = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (B, T-1, V), bf16 -> fp32
    z = z / temperature
    # log softmax(z)[y] = z[y] − logsumexp(z), without materialising the whole log-softmax
    tok_logp = z.gather(-1, tokens[:, 1:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)  # (B, T-1)
    return torch.where(m, tok_logp, 0.0).sum(1) / n

def task_loss(logp):
    """L on a task batch: the mean over sequences of l_θ = −ℓ̄_θ(y|x) (the paper's "perplexity"). Per sequence, not
    per token: each of n tokens weighs 1/n, so the task alone favours stopping early (on lengths alone it converges
    to q(n) ∝ p_data(n)/n, whose mean is the harmonic mean of the data's lengths)."""
    return -logp.mean()

def reinforce_surrogate(logp, c, lam):
    """Σ_i λ_i · mean_b(c_bi · ℓ̄_θ(y_b)), minimised on a constraint step; logp (B,) ℓ̄_θ of the sampled responses,
    c (B, k) = b − r and lam (k,) constants. ∇surrogate = Σ_i λ_i·mean_b(c_bi·∇ℓ̄_θ(y_b)), and by the log-derivative
    trick (Eq. 12) mean_b(c_bi·∇log π_θ(y_b)) estimates ∇C_i: the step is along −Σ_i λ_i ∇C_i, the constraint part
    of Eq. 11 (∇ℓ̄ for ∇log π, §5.4). C_i is to decrease and the surrogate is minimised: hence c = b − r, not r − b.
    Under data parallelism the gradient average over ranks makes the mean global (exactly, with B rows per rank)."""
    per_constraint = (c.detach().to(logp.dtype) * logp[:, None]).mean(0)  # (k,)
    return (lam.detach().to(per_constraint) * per_constraint).sum()
