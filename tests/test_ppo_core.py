"""PPO tensor math against slow loop references, on random inputs with prefix masks (pads / post-EOS)."""

import math

import pytest
import torch

from pipeline.rl.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

B, T = 5, 9


def random_batch(seed=0, garbage=float("nan")):
    """Per-token tensors with prefix masks of random lengths (one full row, one length-1 row); masked
    positions hold `garbage`, which must not leak into any result."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()

    def rand(scale=1.0):
        x = torch.randn(B, T, generator=g, dtype=torch.float64) * scale
        return torch.where(mask.bool(), x, garbage)

    return mask, lengths.tolist(), rand, g


def entries(x, mask):
    return [x[b, t].item() for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]


def test_masked_mean_var_whiten_match_loops():
    mask, lengths, rand, _ = random_batch(1)
    x = rand(3.0) + 2.0
    vals = entries(x, mask)
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    assert masked_mean(x, mask).item() == pytest.approx(mean, rel=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(var, rel=1e-12)
    row_means = masked_mean(x, mask, dim=1)
    for b, L in enumerate(lengths):
        assert row_means[b].item() == pytest.approx(sum(x[b, :L].tolist()) / L, rel=1e-12)

    w = masked_whiten(x, mask)
    w_noshift = masked_whiten(x, mask, shift_mean=False)
    for b, L in enumerate(lengths):
        for t in range(T):
            if t < L:
                assert w[b, t].item() == pytest.approx((x[b, t].item() - mean) / math.sqrt(var + 1e-8), rel=1e-9)
                assert w_noshift[b, t].item() == pytest.approx((x[b, t].item() - mean) / math.sqrt(var + 1e-8) + mean, rel=1e-9)
            else:
                assert w[b, t].item() == 0.0 and w_noshift[b, t].item() == 0.0
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators(estimator):
    g = torch.Generator().manual_seed(2)
    lp, ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4, -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    kl = kl_penalty(lp, ref, estimator)
    for b in range(B):
        for t in range(T):
            p, q = lp[b, t].item(), ref[b, t].item()
            expected = p - q if estimator == "k1" else (math.exp(q - p) - 1) - (q - p)
            assert kl[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    if estimator == "k3":
        assert (kl >= 0).all()
    # both are unbiased estimates of KL(p || q): check by sampling from p
    logits_p, logits_q = torch.randn(6, dtype=torch.float64, generator=g), torch.randn(6, dtype=torch.float64, generator=g)
    logp, logq = logits_p.log_softmax(0), logits_q.log_softmax(0)
    exact = (logp.exp() * (logp - logq)).sum().item()
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    estimate = kl_penalty(logp[samples], logq[samples], estimator).mean().item()
    assert estimate == pytest.approx(exact, abs=0.02)
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k2")


def test_compute_rewards_puts_score_at_last_real_token():
    mask, lengths, rand, g = random_batch(3)
    lp, ref = rand() - 2, rand() - 2
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    rewards, kl = compute_rewards(scores, lp, ref, mask, kl_coef=0.3, estimator="k1")
    for b, L in enumerate(lengths):
        for t in range(T):
            if t >= L:
                expected = 0.0
            else:
                expected = -0.3 * (lp[b, t].item() - ref[b, t].item()) + (scores[b].item() if t == L - 1 else 0.0)
            assert rewards[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert not torch.isnan(kl).any()


def reference_gae(rewards, values, lengths, gamma, lam):
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b, L in enumerate(lengths):
        last = 0.0
        for t in reversed(range(L)):
            next_value = values[b][t + 1] if t + 1 < L else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + values[b][t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_loop(gamma, lam):
    mask, lengths, rand, _ = random_batch(4)
    rewards, values = rand(), rand()
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(ref_ret, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_gae_long_response_float32():
    # (gamma*lam)^k must underflow to 0 gracefully for long responses
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(2, 3000, generator=g), torch.randn(2, 3000, generator=g)
    mask = torch.ones(2, 3000, dtype=torch.long)
    adv, _ = gae(r, v, mask, 1.0, 0.95)
    ref_adv, _ = reference_gae_rows(r.double(), v.double(), 1.0, 0.95)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-4, atol=1e-4)


def reference_gae_rows(r, v, gamma, lam):
    adv = torch.zeros_like(r)
    last = torch.zeros(r.shape[0], dtype=r.dtype)
    for t in reversed(range(r.shape[1])):
        nv = v[:, t + 1] if t + 1 < r.shape[1] else 0.0
        last = r[:, t] + gamma * nv - v[:, t] + gamma * lam * last
        adv[:, t] = last
    return adv, adv + v


def test_policy_loss_matches_loop():
    mask, lengths, rand, _ = random_batch(6)
    old = rand(0.5) - 2
    new = torch.where(mask.bool(), old + rand(0.3), float("nan"))  # ratios both inside and outside [0.8, 1.2]
    adv = rand()
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, mask, clip_range=0.2)
    losses, clipped, kls = [], [], []
    for b, L in enumerate(lengths):
        for t in range(L):
            ratio = math.exp(new[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            l1, l2 = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            losses.append(max(l1, l2))
            clipped.append(float(l2 > l1))
            kls.append(0.5 * (new[b, t].item() - old[b, t].item()) ** 2)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert clipfrac.item() == pytest.approx(sum(clipped) / len(clipped), rel=1e-12)
    assert 0 < clipfrac.item() < 1
    assert approx_kl.item() == pytest.approx(sum(kls) / len(kls), rel=1e-12)


def test_policy_loss_gradient_is_finite_and_ignores_masked_positions():
    mask, _, rand, _ = random_batch(7)
    old, adv = rand() - 2, rand()
    new = (old.nan_to_num(0.0) + 0.1).requires_grad_()
    loss, _, _ = policy_loss(new, old, torch.where(mask.bool(), adv, 0.0), mask)
    loss.backward()
    assert torch.isfinite(new.grad).all()
    assert (new.grad[~mask.bool()] == 0).all()


def test_value_loss_matches_loop():
    mask, lengths, rand, _ = random_batch(8)
    old_values, returns = rand(), rand()
    values = old_values + rand(0.4)
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    losses, clipped = [], []
    for b, L in enumerate(lengths):
        for t in range(L):
            v, vo, R = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
            vc = vo + min(max(v - vo, -0.2), 0.2)
            l1, l2 = (v - R) ** 2, (vc - R) ** 2
            losses.append(0.5 * max(l1, l2))
            clipped.append(float(l2 > l1))
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert clipfrac.item() == pytest.approx(sum(clipped) / len(clipped), rel=1e-12)
    assert 0 < clipfrac.item() < 1
    unclipped, _ = value_loss(values, old_values, returns, mask, clip_range_value=None)
    assert unclipped.item() == pytest.approx(0.5 * masked_mean((values - returns) ** 2, mask).item(), rel=1e-12)


def test_entropy_and_explained_variance():
    logits = torch.randn(3, 4, 11, dtype=torch.float64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected.float(), rtol=1e-5, atol=1e-6)
    mask, _, rand, _ = random_batch(9)
    targets = rand()
    assert explained_variance(targets, targets, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(targets), targets, mask).item() < 0.1


def test_adaptive_kl_controller_moves_towards_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(current_kl=12.0, n_steps=10)  # KL too high -> stronger penalty
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    high = ctl.value
    ctl.update(current_kl=1.0, n_steps=10)  # KL too low -> weaker penalty
    assert ctl.value < high
    low = ctl.value
    ctl.update(current_kl=6.0, n_steps=10)  # on target -> unchanged
    assert ctl.value == pytest.approx(low)
    ctl.update(current_kl=float("nan"), n_steps=10)
    assert ctl.value == pytest.approx(low)
    restored = AdaptiveKLController(0.5, target=6.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.2)
    fixed.update(100.0, 10)
    assert fixed.value == 0.2
