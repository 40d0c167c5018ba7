"""Loss functions as pure tensor functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many positions there were."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    count = int((shifted_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, count


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(correct, labelled) next-token predictions: the argmax at each labelled position against its label."""
    shifted_labels = labels[:, 1:]
    labelled = shifted_labels != IGNORE_INDEX
    correct = (logits[:, :-1, :].argmax(dim=-1) == shifted_labels) & labelled
    return float(correct.sum()), float(labelled.sum())


# --------------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities
# --------------------------------------------------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed log p(label) over labelled positions, and how many there were ([B, T, V], [B, T] -> [B], [B]).

    Only the labelled rows of the logits are upcast to fp32 and only a logsumexp is kept per position, so no
    [B, T, V] fp32 log_softmax is ever built: in preference training most positions are prompt and masked out.
    """
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    row_of_position, position = mask.nonzero(as_tuple=True)
    picked_rows = shifted_logits[row_of_position, position]  # [N, V] in the logits' own dtype
    targets = shifted_labels[row_of_position, position]
    target_logits = picked_rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    token_logps = target_logits - torch.logsumexp(picked_rows.float(), dim=-1)
    sums = torch.zeros(logits.size(0), dtype=torch.float32, device=logits.device)
    sums = sums.index_add(0, row_of_position, token_logps)
    return sums, mask.sum(dim=-1).float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) at each position ([B, T, V], [B, T] -> [B, T]) in fp32, by gather and logsumexp (no
    vocabulary-sized log_softmax kept)."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# Preference losses: every function returns per-pair (or per-example) values, the caller reduces
# --------------------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "kto_pair")


def pairwise_ranking_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry reward-model loss per pair, in fp32 so bf16 scores do not round the small margins away."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())


def _kto_pair_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Paired KTO: each side is scored against the other side's batch KL estimate, the two halves averaged per pair."""
    chosen_kl = chosen_logratios.mean().clamp(min=0)
    rejected_kl = rejected_logratios.mean().clamp(min=0)
    chosen_term = 1 - torch.sigmoid(beta * (chosen_logratios - rejected_kl))
    rejected_term = 1 - torch.sigmoid(beta * (chosen_kl - rejected_logratios))
    return (chosen_term + rejected_term) / 2


def dpo_loss(
    loss_type: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference-based preference loss per pair, with the implicit rewards beta * (policy - ref) for logging."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown DPO loss type {loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}.")
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is only defined for the sigmoid DPO loss, not {loss_type!r}.")
    chosen_logratios = chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = rejected_logps.float() - ref_rejected_logps.float()
    margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        # Conservative DPO: with probability label_smoothing the preference label is taken to be flipped.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = _kto_pair_losses(chosen_logratios, rejected_logratios, beta)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation: expm1 near 0, log1p far from it (Maechler's split at -log 2).

    Each branch only sees inputs where it is finite, so the unused branch cannot put NaN into the gradient.
    """
    split = -math.log(2.0)
    near_zero = x > split
    log_of_expm1 = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, split))))
    log_of_log1p = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, split), x)))
    return torch.where(near_zero, log_of_expm1, log_of_log1p)


def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference-free ORPO per pair: chosen NLL plus beta times the odds-ratio penalty, on length-averaged logps.

    Averages are clamped just below 0 so a response the model is certain of (logp == 0) keeps finite log-odds.
    """
    chosen = chosen_avg_logps.float().clamp(max=-1e-6)
    rejected = rejected_avg_logps.float().clamp(max=-1e-6)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -chosen_avg_logps.float() - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg_logps.float().detach(), beta * rejected_avg_logps.float().detach()


def simpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference-free SimPO per pair: a sigmoid loss on the length-averaged margin, minus a target margin gamma."""
    chosen = chosen_avg_logps.float()
    rejected = rejected_avg_logps.float()
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    chosen_weight: float,
    rejected_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpaired KTO per example: desirable rows are pushed above the KL baseline z0, undesirable rows below it."""
    logratios = policy_logps.float() - ref_logps.float()
    desirable_losses = chosen_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_losses = rejected_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach()


def kto_kl_baseline(kl_sum: float, kl_count: float) -> float:
    """KTO's reference point z0 from globally reduced sums: clamped at 0 since a KL divergence cannot be negative."""
    if kl_count <= 0:
        return 0.0
    return max(0.0, float(kl_sum) / float(kl_count))


# --------------------------------------------------------------------------------------------------------------------
# PPO pieces. Tensors are [B, T] over response tokens; mask is 1 on valid tokens, contiguous from position 0.
# --------------------------------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the valid entries; 0 (not NaN) where there are none, so an empty response cannot poison a batch."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim=dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise the valid entries together (unbiased variance); masked-out entries come back as 0."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    count = mask.sum()
    squared = masked_mean((values - mean) ** 2, mask)
    var = squared * count / (count - 1) if count > 1 else squared
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def _last_valid_onehot(mask: torch.Tensor) -> torch.Tensor:
    """1 at each row's last valid position (mask is contiguous from 0), all-zero for an empty row."""
    lengths = mask.long().sum(dim=1, keepdim=True)
    positions = torch.arange(mask.size(1), device=mask.device).unsqueeze(0)
    return positions == lengths - 1


def kl_shaped_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: a KL penalty on every valid token plus the sequence score on the last one."""
    valid = mask.bool()
    kl = torch.where(valid, logprobs - ref_logprobs, torch.zeros_like(logprobs))
    rewards = -kl_coef * kl
    rewards = rewards + _last_valid_onehot(mask).to(rewards.dtype) * scores.to(rewards.dtype).unsqueeze(1)
    return rewards, kl


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE, run backwards over each row. No grad: advantages and returns are fixed targets for the update."""
    mask = mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask  # zero past the last valid token, so bootstrapping there adds nothing
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_values = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_values = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate summed over valid tokens, and how many tokens the clip decided (clip fraction numerator).

    The log-ratio is zeroed on masked tokens before exp, so garbage there cannot overflow into inf * 0 = NaN.
    """
    valid = mask.bool()
    ratio = torch.exp(torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs)))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    per_token = torch.where(valid, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    clipped_count = (valid & (clipped > unclipped)).sum().float()
    return per_token.sum(), clipped_count


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss summed over valid tokens, and how many tokens the clipped error decided."""
    valid = mask.bool()
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    per_token = torch.where(valid, torch.maximum(unclipped_error, clipped_error), torch.zeros_like(values))
    clipped_count = (valid & (clipped_error > unclipped_error)).sum().float()
    return 0.5 * per_token.sum(), clipped_count


class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive KL coefficient: nudges kl_coef so the measured KL tracks a target."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10000):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Proportional control, the error clipped to +-20% so one noisy KL estimate cannot swing the coefficient."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean/std of reward scores over updates, for score normalisation that survives a resume.

    Batches are merged with Chan et al.'s parallel formula, so feeding batch statistics one after another gives the
    statistics of all scores together. `var` is the population variance; `std` uses the unbiased estimate.
    """

    def __init__(self):
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 0.0

    def update(self, mean: float, var: float, count: float) -> None:
        """Merge one batch given its (globally reduced) mean, population variance and number of scores."""
        count = float(count)
        if count <= 0:
            return
        total = self.count + count
        delta = float(mean) - self.mean
        sum_squares = self.var * self.count + float(var) * count + delta**2 * self.count * count / total
        self.mean += delta * count / total
        self.var = sum_squares / total
        self.std = math.sqrt(sum_squares / (total - 1)) if total > 1 else 0.0
        self.count = total

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / max(self.std, 1e-8)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var = float(state["mean"]), float(state["var"])
        self.std, self.count = float(state["std"]), float(state["count"])
