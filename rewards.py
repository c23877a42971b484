"""Rewards r_i(y|x) and constraints (r_i, b_i) for L3M fine-tuning, written
C_i = E[b_i − r_i] ≤ 0.

    helpful = LearnedReward(model.load_model("out/rm_helpful/best")[0])
    rewards = {"length": length_reward, "helpful": helpful}
    texts = ["length>=50", "length<=100", "P[helpful>=-1.5]>=0.9"]
    constraints = parse_constraints(texts, rewards)
    samples = Samples.from_generate(prompts, responses, ended, tokenizer)
    c = costs(constraints, samples)   # (B, k), c_i = b_i − r_i

Constraints on the command line (one --constraint each):

    NAME>=NUMBER              average constraint E[r] ≥ NUMBER: reward r, b = NUMBER
    NAME<=NUMBER              E[r] ≤ NUMBER, i.e. reward −r, b = −NUMBER
    P[NAME>=NUMBER]>=PROB     chance constraint (§4.1): reward 1{r ≥ NUMBER}, b = PROB
    P[NAME<=NUMBER]>=PROB     reward 1{r ≤ NUMBER}, b = PROB

NAME: "length", "ended_length", or a learned reward model's name. No strict < or >: on an
average they would mean ≤ and ≥. NUMBER is on the reward's own scale:
- length, ended_length: tokens;
- a learned reward: the reward model's mean log-likelihood per token, ℓ̄_φ ≤ 0, in nats;
  not the paper's 0–4 scale, on which "helpful>=3" could never be met.

Where this departs from the paper, or fixes what it leaves open:
- Length (§6.2) is |y|, the number of response tokens *excluding* the EOS (a response
  cut at max_new_tokens has none). "length>=l_low" gives r = |y|, b = l_low where §6.2
  writes r₁ = |y| − l_low, b₁ = 0: the same c = l_low − |y|.
- Learned rewards (App. A.1) are the reward model's ℓ̄_φ(y|x) *including* the EOS of an
  ended response, as in its Bradley–Terry training on full responses. Every reward
  returns float32 (B,) on the CPU.
"""
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

import data
import l3m


@dataclass
class Samples:
    """A batch of prompts x and sampled responses y, as token ids and as text."""
    prompts: list  # B lists of prompt ids (BOS first)
    responses: list  # B lists of sampled ids (model.generate), EOS last if the response ended
    ended: list  # B bools: the response ended with EOS
    prompt_texts: list  # B str
    response_texts: list  # B str, without the EOS

    @classmethod
    def from_generate(cls, prompts, responses, ended, tokenizer):
        """From model.generate's (responses, ended) for these prompts."""
        prompt_ids = [list(prompt) for prompt in prompts]
        response_ids = [list(response) for response in responses]
        prompt_texts = [tokenizer.decode(prompt) for prompt in prompts]
        # an ended response's last id is its EOS (has_eos is a bool: 1 or 0 ids to drop)
        response_texts = [tokenizer.decode(response[:len(response) - has_eos])
                          for response, has_eos in zip(responses, ended)]
        return cls(prompt_ids, response_ids, list(ended), prompt_texts, response_texts)

RewardFn = Callable[[Samples], torch.Tensor]  # Samples -> float32 (B,)


@dataclass(frozen=True)
class Constraint:
    """E[r(y|x)] ≥ b, i.e. C = E[b − r] ≤ 0 (Eq. 4–5)."""
    name: str
    reward: RewardFn
    b: float

    def cost(self, samples: Samples) -> torch.Tensor:
        """c = b − r(y|x), float32 (B,); its batch mean estimates C."""
        return self.b - self.reward(samples)


def costs(constraints, samples) -> torch.Tensor:
    """c_i = b_i − r_i(y|x) for every constraint, float32 (B, k), k ≥ 0 (Eq. 5)."""
    if not constraints:
        return torch.zeros(len(samples.prompts), 0)
    return torch.stack([con.cost(samples) for con in constraints], 1)  # (B, k)


def verdict(C: float, se: float, z: float = 2.0) -> str:
    """An estimate C (mean of b − r over n responses) with standard error se:
    'satisfied' (C ≤ 0), 'within noise' (0 < C ≤ z·se) or 'violated'. At an active
    constraint's KKT point, C ~ N(0, se²): 'violated' 2 % of the time."""
    if C <= 0:
        return "satisfied"
    if C <= z * se:
        return "within noise"
    return "violated"


def length_reward(samples: Samples) -> torch.Tensor:
    """|y| in tokens, excluding the EOS (§6.2)."""
    lengths = [len(response) - has_eos
               for response, has_eos in zip(samples.responses, samples.ended)]
    return torch.tensor(lengths, dtype=torch.float32)


def ended_length(samples: Samples) -> torch.Tensor:
    """|y| of an answer that ended with EOS, 0 for one cut at max_new_tokens. A lower bound
    on |y| is cheapest to meet with answers that never stop; on this reward they earn
    nothing, so "P[ended_length>=8]>=0.6" asks for answers that reach 8 tokens *and* end.
    Upper bounds are on "length": here a cut answer would count as short."""
    return length_reward(samples) * torch.tensor(samples.ended, dtype=torch.float32)


def degenerate(samples: Samples, n: int = 4, repeats: int = 3) -> torch.Tensor:
    """Which answers are degenerate, float32 (B, 3) of 0 or 1: empty (no token before
    the EOS), caught in a loop (some n tokens in a row occur `repeats` times or more,
    overlaps counted), and cut at max_new_tokens (no EOS). A length constraint met by
    such answers is not met."""
    rows = []
    for response, has_eos in zip(samples.responses, samples.ended):
        body = list(response[:len(response) - has_eos])
        grams = Counter(tuple(body[i:i + n]) for i in range(len(body) - n + 1))
        looped = max(grams.values(), default=0) >= repeats
        rows.append([len(body) == 0, looped, not has_eos])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 3)


def sequence_reward(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_φ(y|x) = ℓ̄_φ(y|x) (App. A.1), the reward model's own length-normalised
    log-likelihood, differentiable."""
    device = next(model.parameters()).device
    tokens, mask = tokens.to(device), mask.to(device)
    return l3m.logp_norm(model(tokens), tokens, mask)  # (B,)


def preference_rewards(model, examples: Sequence, pad_id: int = 0) -> tuple:
    """(r(y⁺|x), r(y⁻|x)), each (B,), for data.PreferenceExamples, with gradients.
    y⁺ and y⁻ go through one forward as a (2B, T) batch: one collective per step under
    FSDP."""
    prompts = [ex.prompt for ex in examples]
    responses = [ex.chosen for ex in examples] + [ex.rejected for ex in examples]
    tokens, mask = data.response_batch(prompts + prompts, responses, pad_id)  # (2B, T)
    return sequence_reward(model, tokens, mask).chunk(2)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of −log σ(r(y⁺|x) − r(y⁻|x)), the negative log-likelihood of the preferences
    (App. A.1)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs ranked right, r(y⁺|x) > r(y⁻|x); a tie counts as wrong."""
    return (r_chosen > r_rejected).float().mean().item()


class LearnedReward:
    """A Bradley–Terry reward model as a reward: eval mode, no gradients, micro-batches
    (small (B, T, V) logits)."""

    def __init__(self, model, pad_id: int = 0, micro_batch: int = 16):
        self.model = model.eval().requires_grad_(False)
        self.pad_id = pad_id
        self.micro_batch = micro_batch

    @torch.no_grad()
    def __call__(self, samples: Samples) -> torch.Tensor:
        out = []
        for i in range(0, len(samples.prompts), self.micro_batch):
            j = slice(i, i + self.micro_batch)
            tokens, mask = data.response_batch(samples.prompts[j], samples.responses[j],
                                               self.pad_id)
            out.append(sequence_reward(self.model, tokens, mask).float().cpu())
        return torch.cat(out)  # (B,)

SYNTAX = "NAME>=NUMBER, NAME<=NUMBER, P[NAME>=NUMBER]>=PROB or P[NAME<=NUMBER]>=PROB"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BOUND = re.compile(rf"\s*(\w+)\s*(>=|<=)\s*({_NUMBER})\s*")
_CHANCE = re.compile(rf"\s*P\[(.*)\]\s*>=\s*({_NUMBER})\s*")


class ConstraintError(ValueError):
    """A constraint that does not parse; the message says what is accepted."""


def _bound(text: str, inner: str, rewards: Mapping[str, RewardFn]) -> tuple:
    """NAME>=NUMBER or NAME<=NUMBER -> (reward, op, threshold)."""
    m = _BOUND.fullmatch(inner)
    if m is None:
        hint = ""
        if re.fullmatch(r"\s*\w+\s*(>=|<=)\s*\S+\s*", inner):
            hint = " (the threshold must be a finite number)"
        elif re.search(r"[<>=]", inner):
            hint = " (use >= or <=, not > or < or =)"
        raise ConstraintError(f"{text!r}: cannot read {inner.strip()!r}{hint}; "
                              f"expected {SYNTAX}")

    name, op, number = m.groups()
    if name not in rewards:
        known = ", ".join(sorted(rewards))
        raise ConstraintError(f"{text!r}: unknown reward {name!r}; known rewards: {known}")
    return rewards[name], op, float(number)


def parse_constraint(text: str, rewards: Mapping[str, RewardFn]) -> Constraint:
    """One constraint, in the module docstring's syntax; a ConstraintError says what is
    wrong."""
    chance = _CHANCE.fullmatch(text)
    if chance is not None:
        reward, op, threshold = _bound(text, chance.group(1), rewards)
        prob = float(chance.group(2))
        if not 0.0 < prob <= 1.0:
            raise ConstraintError(f"{text!r}: a probability must lie in (0, 1], not {prob}")
        # P[r ≥ t] ≥ 1 − ε with 1 − ε = prob (§4.1, l3m.chance); P[r ≤ t] = P[−r ≥ −t]
        sign = 1.0 if op == ">=" else -1.0
        indicator, b = l3m.chance(lambda samples: sign * reward(samples), sign * threshold,
                                  1.0 - prob)
        return Constraint(text.strip(), indicator, b)

    if text.lstrip().startswith("P["):
        raise ConstraintError(f"{text!r}: a chance constraint reads P[NAME>=NUMBER]>=PROB; "
                              f"expected {SYNTAX}")
    reward, op, threshold = _bound(text, text, rewards)
    if op == ">=":
        return Constraint(text.strip(), reward, threshold)
    # E[r] ≤ t is E[−r] ≥ −t
    return Constraint(text.strip(), lambda samples: -reward(samples), -threshold)


def parse_constraints(texts: Sequence[str], rewards: Mapping[str, RewardFn]) -> list:
    """Every --constraint, in order; names must be unique."""
    constraints = [parse_constraint(text, rewards) for text in texts]
    if len({con.name for con in constraints}) != len(constraints):
        names = [con.name for con in constraints]
        raise ConstraintError(f"a constraint is given twice: {names}")
    return constraints
