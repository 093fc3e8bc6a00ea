"""Online RL arithmetic: advantages (GRPO, RLOO, PPO's GAE), the KL estimator, and the clipped losses.

Pure tensor functions, no model: the trainer generates completions, scores them and calls these. Shapes:
`rewards` [N] with the N = prompts x num_generations completions of a batch grouped by prompt (the
num_generations completions of prompt 0 first); per-token tensors [N, T] with a `mask` [N, T] that is 1 on the
completion tokens that count. Formulas: docs/rlhf.md.
"""

from __future__ import annotations

import torch

# Added to a group's standard deviation before dividing (as TRL does), so a group of equal rewards gives 0.
STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: bool = True) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, divided by the group's (unbiased) std + 1e-4 when `scale`."""
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
        advantages = advantages / (std + STD_EPS)
    return advantages.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO: each reward minus the mean of the other completions of its prompt."""
    if num_generations < 2:
        raise ValueError("RLOO needs num_generations >= 2 (a baseline from the other completions)")
    grouped = rewards.view(-1, num_generations)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - baseline).reshape(-1)


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, 0 when equal)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries (the mean added back when not `shift_mean`)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO-clip loss -min(ratio * A, clip(ratio, 1 -+ eps) * A) (+ beta * KL to the reference), averaged
    over all counted tokens of the batch. `advantages` is [N] (one per completion) or [N, T] (per token)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    stats = {"clip_fraction": masked_mean(((ratio - clipped).abs() > 0).float(), mask).detach()}
    if ref_logps is not None:
        kl = kl_per_token(logps, ref_logps)
        stats["kl"] = masked_mean(kl, mask).detach()
        if beta:
            per_token = per_token + beta * kl
    return masked_mean(per_token, mask), stats


def sequence_clipped_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float = 0.2
) -> torch.Tensor:
    """RLOO's sequence-level PPO-clip: the ratio of whole completions (summed log-probs), mean over completions."""
    ratio = torch.exp(((logps - old_logps) * mask).sum(-1))
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return -torch.min(ratio * advantages, clipped * advantages).mean()


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each completion's tokens: (advantages, returns), both [N, T].

    `rewards` [N, T] per token (the score on the last token, minus per-token KL penalties), `values` [N, T];
    after the last counted token the value is 0. returns = advantages + values.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss 0.5 * max((v - R)^2, (clip(v, v_old -+ eps) - R)^2), and the fraction of clipped tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    fraction = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask)
    return 0.5 * masked_mean(losses, mask), fraction.detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the counted tokens (1: perfect value head)."""
    residual = masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask)
    total = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    return 1 - residual / total.clamp_min(1e-8)


def token_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """InstructGPT's per-token reward: -beta * (logp - ref) on every token, plus the score on the last one."""
    rewards = -beta * (logps - ref_logps) * mask
    last = mask.long().cumsum(-1).argmax(-1)  # the last counted token of each completion
    rewards[torch.arange(len(scores)), last] += scores
    return rewards
