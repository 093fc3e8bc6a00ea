"""Online-RL arithmetic against hand-computed values and closed forms (component/train/rl.py)."""

from __future__ import annotations

import math

import pytest
import torch

from component.train.rl import (
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    group_advantages,
    kl_per_token,
    leave_one_out_advantages,
    sequence_clipped_loss,
    token_rewards,
    whiten,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])  # two prompts x three completions
    std = math.sqrt(((1 - 2) ** 2 + (3 - 2) ** 2 + 0) / 2)  # unbiased: 1.0
    expected = [-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0, -2 / (2 + 1e-4), 2 / (2 + 1e-4)]
    torch.testing.assert_close(group_advantages(rewards, 3), torch.tensor(expected))
    torch.testing.assert_close(group_advantages(rewards, 3, scale=False), torch.tensor([-1.0, 1, 0, 0, -2, 2]))


def test_leave_one_out_advantages_by_hand():
    rewards = torch.tensor([1.0, 3.0, 2.0, 5.0])  # two prompts x two completions
    torch.testing.assert_close(leave_one_out_advantages(rewards, 2), torch.tensor([-2.0, 2.0, -3.0, 3.0]))
    rewards = torch.tensor([1.0, 3.0, 2.0])
    torch.testing.assert_close(leave_one_out_advantages(rewards, 3), torch.tensor([1 - 2.5, 3 - 1.5, 2 - 2.0]))
    with pytest.raises(ValueError, match="num_generations >= 2"):
        leave_one_out_advantages(rewards, 1)


@pytest.mark.parametrize("advantage", [group_advantages, leave_one_out_advantages])
def test_a_constant_reward_gives_no_advantage(advantage):
    assert advantage(torch.full((8,), 3.7), 4).abs().max() == 0


def test_kl_estimator_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logps = torch.tensor([-1.0, -2.5, -0.1])
    assert kl_per_token(logps, logps).abs().max() == 0
    other = torch.tensor([-1.5, -2.0, -0.3])
    delta = other - logps
    torch.testing.assert_close(kl_per_token(logps, other), torch.exp(delta) - delta - 1)
    assert (kl_per_token(logps, other) > 0).all()


def test_ratio_is_one_on_the_first_pass_and_the_loss_is_minus_the_mean_advantage():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([2.0, -1.0])
    loss, stats = clipped_policy_loss(logps, logps.detach(), advantages, mask)
    # ratio 1 everywhere: loss = -(3 * 2 + 2 * -1) / 5 tokens; nothing clipped
    assert loss.item() == pytest.approx(-(3 * 2 - 2) / 5)
    assert stats["clip_fraction"].item() == 0
    loss.backward()  # d/dlogp of -ratio * A / 5 at ratio 1 is -A / 5 on counted tokens, 0 on the padding
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]]))


def test_clipping_by_hand():
    old = torch.zeros(1, 2)
    logps = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_(True)  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    loss, stats = clipped_policy_loss(logps, old, torch.tensor([1.0]), mask, clip_range=0.2)
    # A > 0: min(1.5, 1.2) = 1.2 (clipped, no gradient); min(0.5, 0.8) = 0.5 (unclipped)
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert stats["clip_fraction"].item() == 1.0  # both ratios lie outside [0.8, 1.2]
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.5 * 0.5]]))  # d(-0.5 r)/dlogp = -0.5 r


def test_kl_term_is_added_with_beta():
    logps, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.2, -1.5]])
    mask = torch.ones(1, 2)
    plain, _ = clipped_policy_loss(logps, logps, torch.tensor([0.0]), mask, ref_logps=ref)
    with_kl, stats = clipped_policy_loss(logps, logps, torch.tensor([0.0]), mask, ref_logps=ref, beta=0.5)
    assert plain.item() == 0
    assert with_kl.item() == pytest.approx(0.5 * kl_per_token(logps, ref).mean().item())
    assert stats["kl"].item() == pytest.approx(kl_per_token(logps, ref).mean().item())


def test_sequence_level_clip_by_hand():
    logps = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0 - math.log(2)], [-2.0, 0.0]])  # sequence ratios 2 and 1
    loss = sequence_clipped_loss(logps, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.0) / 2)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7]]))


def test_gae_stops_at_the_end_of_each_completion():
    rewards = torch.tensor([[0.0, 2.0, 9.0]])
    values = torch.tensor([[1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding: neither its reward nor its value counts
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0 + 1 - 1 + (2 - 1), 2.0 - 1.0, 0.0]]))
    assert returns[0, 2] == 0


def test_value_loss_clips_like_ppo():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, fraction = clipped_value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: unclipped (1-0)^2 = 1, clipped (0.2-0)^2 = 0.04 -> max 1; token 1: both (0-1)^2 = 1
    assert loss.item() == pytest.approx(0.5 * (1 + 1) / 2)
    assert fraction.item() == 0


def test_explained_variance_is_one_for_a_perfect_value_head():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    assert explained_variance(returns, returns, torch.ones(1, 3)).item() == pytest.approx(1.0)
    # a constant prediction explains none of the variance
    assert explained_variance(torch.zeros(1, 3), returns, torch.ones(1, 3)).item() == pytest.approx(0.0)


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_penalty_everywhere():
    logps, ref = torch.tensor([[-1.0, -1.0, -1.0]]), torch.tensor([[-1.5, -0.5, -1.0]])
    rewards = token_rewards(torch.tensor([2.0]), logps, ref, torch.tensor([[1, 1, 0]]), beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.05 + 2.0, 0.0]]))


def test_whiten_gives_zero_mean_unit_variance_on_counted_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = whiten(values, mask)
    counted = out[mask.bool()]
    assert counted.mean().abs() < 1e-6 and (counted.pow(2).mean() - 1).abs() < 1e-4
