"""Pure tensor losses: hand-computed values, TRL 1.16 as a reference where it has the same loss, and edge cases."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from workers.losses import (
    IGNORE_INDEX,
    AdaptiveKLController,
    RunningMoments,
    dpo_loss,
    gae_advantages,
    kl_shaped_rewards,
    kto_kl_baseline,
    kto_loss,
    masked_mean,
    masked_whiten,
    orpo_loss,
    pairwise_ranking_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
    simpo_loss,
)

# TRL's CPO and ORPO trainers live in trl.experimental, which warns on import; they are only references here.
pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


def close(actual, expected, tol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32), expected, atol=tol, rtol=tol)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# A fixed batch of three pairs used throughout: summed policy / reference log-probs.
PC = torch.tensor([-4.0, -7.5, -2.0])
PR = torch.tensor([-6.0, -7.0, -3.5])
RC = torch.tensor([-4.5, -7.0, -2.5])
RR = torch.tensor([-5.0, -7.2, -3.0])


# --------------------------------------------------------------------------------------------------------------------
# sequence_logps
# --------------------------------------------------------------------------------------------------------------------


def test_sequence_logps_hand_computed():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])  # logits[0] predicts label 1, logits[1] predicts label 2
    sums, counts = sequence_logps(logits, labels)
    first = 2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.0))
    second = 3.0 - math.log(2 * math.exp(0.5) + math.exp(3.0))
    close(sums, [first + second])
    close(counts, [2.0])
    assert sums.dtype == torch.float32 and counts.dtype == torch.float32


def test_sequence_logps_matches_log_softmax_reference_and_trl():
    from trl.experimental.cpo import CPOTrainer

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = IGNORE_INDEX
    labels[1, :] = IGNORE_INDEX  # fully masked row
    labels[2, :5] = IGNORE_INDEX  # single labelled token
    sums, counts = sequence_logps(logits, labels)
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    naive = torch.log_softmax(logits[:, :-1], -1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    close(sums, (naive * mask).sum(-1))
    close(counts, [3.0, 0.0, 1.0])
    # TRL's static helper sums the same shifted, -100-masked token log-probs.
    close(sums, CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=False))


def test_sequence_logps_bf16_input_gives_fp32_and_gradients():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7).bfloat16().requires_grad_()
    labels = torch.randint(0, 7, (2, 5))
    labels[:, :2] = IGNORE_INDEX
    sums, _ = sequence_logps(logits, labels)
    assert sums.dtype == torch.float32
    shifted = labels[:, 1:].clamp(min=0).unsqueeze(-1)
    reference = torch.log_softmax(logits.detach().float()[:, :-1], -1).gather(-1, shifted).squeeze(-1)
    close(sums.detach(), (reference * (labels[:, 1:] != IGNORE_INDEX)).sum(-1))
    sums.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()
    assert logits.grad[:, 0].abs().sum() == 0  # position 0 predicts a masked label


def test_sequence_logps_fully_masked_batch():
    sums, counts = sequence_logps(torch.randn(2, 4, 5), torch.full((2, 4), IGNORE_INDEX))
    close(sums, [0.0, 0.0])
    close(counts, [0.0, 0.0])


# --------------------------------------------------------------------------------------------------------------------
# Preference losses: hand-computed values
# --------------------------------------------------------------------------------------------------------------------


def test_pairwise_ranking_loss_hand_computed():
    losses = pairwise_ranking_loss(torch.tensor([2.0, 0.0], dtype=torch.bfloat16), torch.tensor([1.0, 0.0]))
    assert losses.dtype == torch.float32
    close(losses, [-logsig(1.0), math.log(2.0)])


def test_dpo_sigmoid_hand_computed_with_and_without_label_smoothing():
    beta = 0.5
    z = beta * ((-4.0 - -6.0) - (-4.5 - -5.0))  # first pair: beta * (2.0 - 0.5)
    losses, chosen_rewards, rejected_rewards = dpo_loss("sigmoid", PC[:1], PR[:1], RC[:1], RR[:1], beta)
    close(losses, [-logsig(z)])
    close(chosen_rewards, [beta * 0.5])
    close(rejected_rewards, [beta * -1.0])
    smoothed, _, _ = dpo_loss("sigmoid", PC[:1], PR[:1], RC[:1], RR[:1], beta, label_smoothing=0.2)
    close(smoothed, [-0.8 * logsig(z) - 0.2 * logsig(-z)])


def test_dpo_hinge_and_ipo_hand_computed():
    beta = 0.5
    margins = [(-4.0 + 6.0) - (-4.5 + 5.0), (-7.5 + 7.0) - (-7.0 + 7.2), (-2.0 + 3.5) - (-2.5 + 3.0)]
    hinge, _, _ = dpo_loss("hinge", PC, PR, RC, RR, beta)
    close(hinge, [max(0.0, 1 - beta * m) for m in margins])
    ipo, _, _ = dpo_loss("ipo", PC, PR, RC, RR, beta)
    close(ipo, [(m - 1 / (2 * beta)) ** 2 for m in margins])


def test_dpo_kto_pair_hand_computed_and_equal_to_concatenated_mean():
    beta = 0.3
    chosen_lr = [0.5, -0.5, 0.5]
    rejected_lr = [-1.0, 0.2, -0.5]
    chosen_kl = max(0.0, sum(chosen_lr) / 3)  # 1/6
    rejected_kl = max(0.0, sum(rejected_lr) / 3)  # negative mean, clamped to 0
    expected = [
        ((1 - sig(beta * (c - rejected_kl))) + (1 - sig(beta * (chosen_kl - r)))) / 2
        for c, r in zip(chosen_lr, rejected_lr, strict=True)
    ]
    losses, chosen_rewards, rejected_rewards = dpo_loss("kto_pair", PC, PR, RC, RR, beta)
    close(losses, expected)
    close(chosen_rewards, [beta * c for c in chosen_lr])
    close(rejected_rewards, [beta * r for r in rejected_lr])
    # The original kto_pair concatenated the 2B chosen and rejected terms and took their mean.
    concatenated = [1 - sig(beta * (c - rejected_kl)) for c in chosen_lr] + [
        1 - sig(beta * (chosen_kl - r)) for r in rejected_lr
    ]
    close(losses.mean(), sum(concatenated) / len(concatenated))


def test_dpo_rejects_unknown_loss_and_label_smoothing_outside_sigmoid():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, kto_pair"):
        dpo_loss("robust", PC, PR, RC, RR, 0.1)
    for loss_type in ("hinge", "ipo", "kto_pair"):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(loss_type, PC, PR, RC, RR, 0.1, label_smoothing=0.1)


def test_dpo_rewards_are_detached_and_losses_carry_gradients():
    chosen = PC.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss("sigmoid", chosen, PR, RC, RR, 0.1)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert (chosen.grad < 0).all()  # raising the chosen log-prob lowers the loss


def test_orpo_hand_computed():
    beta = 0.25
    c, r = -0.4, -1.3
    log_odds = (c - r) - (math.log1p(-math.exp(c)) - math.log1p(-math.exp(r)))
    losses, chosen_rewards, rejected_rewards = orpo_loss(torch.tensor([c]), torch.tensor([r]), beta)
    close(losses, [-c - beta * logsig(log_odds)])
    close(chosen_rewards, [beta * c])
    close(rejected_rewards, [beta * r])


def test_orpo_is_finite_when_a_response_is_certain():
    chosen = torch.tensor([0.0, -1e-9, -0.01], requires_grad=True)
    rejected = torch.tensor([-0.5, 0.0, -1e-8], requires_grad=True)
    losses, _, _ = orpo_loss(chosen, rejected, 0.1)
    assert torch.isfinite(losses).all()
    losses.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_simpo_hand_computed():
    beta, gamma = 2.0, 0.5
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        torch.tensor([-0.8, -1.0]), torch.tensor([-1.1, -1.0]), beta, gamma
    )
    close(losses, [-logsig(beta * 0.3 - gamma), -logsig(-gamma)])
    close(chosen_rewards, [-1.6, -2.0])
    close(rejected_rewards, [-2.2, -2.0])


def test_kto_loss_hand_computed():
    beta, kl = 0.1, 0.4
    policy = torch.tensor([-3.0, -5.0, -2.0])
    ref = torch.tensor([-4.0, -4.0, -2.0])
    desirable = torch.tensor([True, False, False])
    losses, rewards = kto_loss(policy, ref, desirable, kl, beta, chosen_weight=1.5, rejected_weight=0.7)
    close(losses, [1.5 * (1 - sig(beta * (1.0 - kl))), 0.7 * (1 - sig(beta * (kl + 1.0))), 0.7 * (1 - sig(beta * kl))])
    close(rewards, [0.1, -0.1, 0.0])
    tensor_kl, _ = kto_loss(policy, ref, desirable, torch.tensor(kl), beta, 1.5, 0.7)
    close(tensor_kl, losses)


def test_kto_kl_baseline():
    assert kto_kl_baseline(3.0, 4.0) == pytest.approx(0.75)
    assert kto_kl_baseline(-3.0, 4.0) == 0.0
    assert kto_kl_baseline(0.0, 0.0) == 0.0
    assert kto_kl_baseline(5.0, 0.0) == 0.0


def test_six_preference_losses_differ_on_the_same_batch():
    beta = 0.2
    lengths_c, lengths_r = torch.tensor([4.0, 5.0, 2.0]), torch.tensor([6.0, 5.0, 3.0])
    values = {}
    for loss_type in ("sigmoid", "hinge", "kto_pair"):
        values[loss_type] = dpo_loss(loss_type, PC, PR, RC, RR, beta)[0].mean().item()
    ipo_inputs = (PC / lengths_c, PR / lengths_r, RC / lengths_c, RR / lengths_r)
    values["ipo"] = dpo_loss("ipo", *ipo_inputs, beta)[0].mean().item()
    values["orpo"] = orpo_loss(PC / lengths_c, PR / lengths_r, beta)[0].mean().item()
    values["simpo"] = simpo_loss(PC / lengths_c, PR / lengths_r, 2.0, 0.5)[0].mean().item()
    assert all(math.isfinite(v) for v in values.values())
    assert len({round(v, 6) for v in values.values()}) == 6, values


def test_equal_chosen_and_rejected():
    same = torch.tensor([-3.0, -1.0])
    ref = torch.tensor([-2.0, -1.5])
    beta = 0.5
    close(dpo_loss("sigmoid", same, same, ref, ref, beta)[0], [math.log(2.0)] * 2)
    close(dpo_loss("sigmoid", same, same, ref, ref, beta, label_smoothing=0.3)[0], [math.log(2.0)] * 2)
    close(dpo_loss("hinge", same, same, ref, ref, beta)[0], [1.0, 1.0])
    close(dpo_loss("ipo", same, same, ref, ref, beta)[0], [1.0, 1.0])  # (0 - 1/(2*0.5))^2
    # kto_pair: both KL estimates are the same (clamped) mean, so the two halves are 1 - s(x) and 1 - s(-x): 1/2.
    close(dpo_loss("kto_pair", same, same, ref, ref, beta)[0], [0.5, 0.5])
    close(pairwise_ranking_loss(same, same), [math.log(2.0)] * 2)
    close(simpo_loss(same, same, 2.0, 0.5)[0], [-logsig(-0.5)] * 2)
    avg = torch.tensor([-0.5, -0.5])
    close(orpo_loss(avg, avg, 0.1)[0], [0.5 + 0.1 * math.log(2.0)] * 2)


# --------------------------------------------------------------------------------------------------------------------
# Preference losses against TRL 1.16. In TRL 1.16 DPOTrainer and KTOTrainer compute their losses inline in
# `_compute_loss(model, inputs, return_outputs)`, so the tests build the trainer with `object.__new__` plus the
# attributes that method reads, and hand it a stand-in model whose `log_probs` sum to the sequence log-probs wanted.
# --------------------------------------------------------------------------------------------------------------------


def _bare_trainer(cls, **attributes):
    trainer = object.__new__(cls)
    common = {
        "accelerator": SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t),
        "model": SimpleNamespace(training=True),
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
        "aux_loss_enabled": False,
    }
    for name, value in {**common, **attributes}.items():
        setattr(trainer, name, value)
    return trainer


def _fake_causal_lm(table: torch.Tensor):
    """A model whose row with input_ids[:, 0] == i has summed completion log-prob table[i]."""

    def forward(input_ids, **_):
        log_probs = torch.zeros(input_ids.size(0), input_ids.size(1) - 1)
        log_probs[:, 0] = table[input_ids[:, 0]]
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return forward


def _trl_dpo_mean(loss_type, pc, pr, rc, rr, beta, lengths=None, label_smoothing=0.0):
    from trl import DPOTrainer

    rows = 2 * pc.numel()
    lengths = torch.ones(rows, dtype=torch.long) if lengths is None else lengths
    width = int(lengths.max()) + 1
    positions = torch.arange(width).unsqueeze(0)
    inputs = {
        "input_ids": torch.arange(rows).unsqueeze(1).repeat(1, width),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": ((positions >= 1) & (positions <= lengths.unsqueeze(1))).long(),  # prompt is token 0
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    trainer = _bare_trainer(
        DPOTrainer,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    return trainer._compute_loss(_fake_causal_lm(torch.cat([pc, pr])), inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_dpo_matches_trl_dpo_trainer(loss_type):
    beta = 0.3
    ours, _, _ = dpo_loss(loss_type, PC, PR, RC, RR, beta)
    for i in range(PC.numel()):  # one pair per call, so the comparison is per pair, not just of the batch mean
        pair = slice(i, i + 1)
        close(ours[i], _trl_dpo_mean(loss_type, PC[pair], PR[pair], RC[pair], RR[pair], beta))
    close(ours.mean(), _trl_dpo_mean(loss_type, PC, PR, RC, RR, beta))


def test_dpo_ipo_matches_trl_dpo_trainer_on_length_averaged_logps():
    # TRL divides the summed log-ratios by each completion's token count; our caller passes averages instead.
    beta = 0.4
    lengths_c, lengths_r = torch.tensor([3, 1, 4]), torch.tensor([2, 5, 4])
    ours, _, _ = dpo_loss("ipo", PC / lengths_c, PR / lengths_r, RC / lengths_c, RR / lengths_r, beta)
    for i in range(PC.numel()):
        pair = slice(i, i + 1)
        lengths = torch.cat([lengths_c[pair], lengths_r[pair]])
        close(ours[i], _trl_dpo_mean("ipo", PC[pair], PR[pair], RC[pair], RR[pair], beta, lengths=lengths))


def test_dpo_label_smoothing_matches_trl_conservative_sigmoid():
    # TRL 1.16's DPOTrainer no longer applies label_smoothing to "sigmoid" (it only feeds "robust", "exo_pair" and
    # "aot", and "robust" divides by 1 - 2*ls, a different loss). The conservative-DPO formula still lives in
    # CPOTrainer.cpo_loss(loss_type="sigmoid"), which applies it to chosen - rejected of whatever it is given: passed
    # the policy-minus-reference log-ratios, that difference is exactly DPO's margin.
    from trl.experimental.cpo import CPOTrainer

    beta = 0.3
    for label_smoothing in (0.0, 0.25):
        trainer = _bare_trainer(CPOTrainer, alpha=0.0, beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing)
        trl_losses, _, _ = trainer.cpo_loss(PC - RC, PR - RR)
        ours, _, _ = dpo_loss("sigmoid", PC, PR, RC, RR, beta, label_smoothing=label_smoothing)
        close(ours, trl_losses)


def _trl_kto_mean(policy, ref, desirable, kl_policy, kl_ref, beta, chosen_weight, rejected_weight):
    from trl import KTOTrainer

    rows, kl_rows = policy.numel(), kl_policy.numel()
    inputs = {
        "input_ids": torch.arange(rows).unsqueeze(1).repeat(1, 2),
        "attention_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * rows),
        "KL_input_ids": (rows + torch.arange(kl_rows)).unsqueeze(1).repeat(1, 2),
        "KL_attention_mask": torch.ones(kl_rows, 2, dtype=torch.long),
        "KL_completion_mask": torch.tensor([[0, 1]] * kl_rows),
        "label": desirable,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    trainer = _bare_trainer(
        KTOTrainer,
        beta=beta,
        loss_type="kto",
        desirable_weight=chosen_weight,
        undesirable_weight=rejected_weight,
        calculate_KL=True,
        precompute_ref_logps=True,
    )
    return trainer._compute_loss(_fake_causal_lm(torch.cat([policy, kl_policy])), inputs, return_outputs=False)


@pytest.mark.parametrize("kl_shift", [0.8, -2.0])  # a positive KL estimate, and a negative one TRL clamps to 0
def test_kto_matches_trl_kto_trainer(kl_shift):
    beta, chosen_weight, rejected_weight = 0.2, 1.3, 0.6
    policy = torch.tensor([-3.0, -5.0, -2.0, -6.5])
    ref = torch.tensor([-4.0, -4.0, -2.5, -6.0])
    desirable = torch.tensor([True, False, True, False])
    kl_ref = torch.tensor([-5.0, -3.0, -4.0])
    kl_policy = kl_ref + torch.tensor([kl_shift, kl_shift + 0.4, kl_shift - 0.4])
    kl_difference = kl_policy - kl_ref
    z0 = kto_kl_baseline(kl_difference.sum().item(), kl_difference.numel())
    ours, _ = kto_loss(policy, ref, desirable, z0, beta, chosen_weight, rejected_weight)
    trl_args = (kl_policy, kl_ref, beta, chosen_weight, rejected_weight)
    close(ours.mean(), _trl_kto_mean(policy, ref, desirable, *trl_args))
    for i in range(policy.numel()):
        row = slice(i, i + 1)
        close(ours[i], _trl_kto_mean(policy[row], ref[row], desirable[row], *trl_args))


def test_simpo_matches_trl_cpo_trainer():
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.6
    chosen, rejected = torch.tensor([-0.8, -1.2, -0.3]), torch.tensor([-1.1, -0.9, -0.3])
    # cpo_alpha = 0 drops CPO's NLL term, which compute_loss adds outside cpo_loss; cpo_loss gives the per-pair SimPO.
    trainer = _bare_trainer(
        CPOTrainer, alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=0.0, cpo_alpha=0.0
    )
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(chosen, rejected)
    ours, ours_chosen, ours_rejected = simpo_loss(chosen, rejected, beta, gamma)
    close(ours, trl_losses)
    close(ours_chosen, trl_chosen)
    close(ours_rejected, trl_rejected)


def test_orpo_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.1
    chosen = torch.tensor([-0.4, -1.2, -0.05, -3.0])
    rejected = torch.tensor([-1.3, -0.9, -0.6, -0.001])
    trl_losses, trl_chosen, trl_rejected, _, _ = _bare_trainer(ORPOTrainer, beta=beta).odds_ratio_loss(chosen, rejected)
    ours, ours_chosen, ours_rejected = orpo_loss(chosen, rejected, beta)
    # TRL returns beta * logsigmoid(log_odds) and subtracts its mean from the chosen NLL.
    close(ours, -chosen - trl_losses)
    close(ours_chosen, trl_chosen)
    close(ours_rejected, trl_rejected)


def test_pairwise_ranking_loss_matches_trl_reward_trainer():
    from trl import RewardTrainer

    chosen, rejected = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.4, 0.3])
    trainer = _bare_trainer(RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=None))
    ours = pairwise_ranking_loss(chosen, rejected)
    for i in range(chosen.numel()):
        scores = torch.stack([chosen[i], rejected[i]]).unsqueeze(-1)
        inputs = {
            "input_ids": torch.zeros(2, 3, dtype=torch.long),
            "attention_mask": torch.ones(2, 3, dtype=torch.long),
        }
        trl_loss = trainer.compute_loss(lambda scores=scores, **_: SimpleNamespace(logits=scores), inputs)
        close(ours[i], trl_loss)


# --------------------------------------------------------------------------------------------------------------------
# PPO pieces
# --------------------------------------------------------------------------------------------------------------------

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # full, single-token and empty rows


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [100.0, 100.0, 100.0]])
    close(masked_mean(values, MASK), (1 + 2 + 3 + 4) / 4)
    close(masked_mean(values, MASK, dim=1), [2.0, 4.0, 0.0])  # empty row gives 0, not NaN
    close(masked_mean(values, MASK.bool(), dim=0), [2.5, 2.0, 3.0])
    close(masked_mean(values, torch.zeros_like(MASK)), 0.0)


def test_masked_whiten():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [100.0, 100.0, 100.0]])
    mean = 2.5
    std = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3 + 1e-8)  # unbiased variance of 1, 2, 3, 4
    whitened = masked_whiten(values, MASK)
    close(whitened[0], [(1 - mean) / std, (2 - mean) / std, (3 - mean) / std])
    close(whitened[1], [(4 - mean) / std, 0.0, 0.0])
    close(whitened[2], [0.0, 0.0, 0.0])
    unshifted = masked_whiten(values, MASK, shift_mean=False)
    close(unshifted[0], [(1 - mean) / std + mean, (2 - mean) / std + mean, (3 - mean) / std + mean])
    close(unshifted[2], [0.0, 0.0, 0.0])
    close(masked_whiten(values, torch.zeros_like(MASK)), torch.zeros(3, 3))


def test_kl_shaped_rewards_with_single_token_and_empty_rows():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 9.0, 9.0], [9.0, 9.0, 9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    scores = torch.tensor([2.0, -1.0, 5.0])
    rewards, kl = kl_shaped_rewards(scores, logprobs, ref_logprobs, MASK, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0], [0.02 - 1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_gae_hand_computed_three_tokens():
    gamma, lam = 1.0, 0.95
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    delta2 = 1.0 + gamma * 0.0 - 0.7  # value past the end counts as 0
    delta1 = 0.0 + gamma * 0.7 - 0.6
    delta0 = 0.0 + gamma * 0.6 - 0.5
    a2 = delta2
    a1 = delta1 + gamma * lam * a2
    a0 = delta0 + gamma * lam * a1
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3), gamma, lam)
    close(advantages, [[a0, a1, a2]])
    close(returns, [[a0 + 0.5, a1 + 0.6, a2 + 0.7]])


def test_gae_ignores_positions_past_the_end_and_empty_rows():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 99.0], [0.3, 99.0, 99.0], [99.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    a1 = 1.0 - 0.4
    a0 = (0.9 * 0.4 - 0.2) + 0.9 * 0.5 * a1
    close(advantages, [[a0, a1, 0.0], [2.0 - 0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(returns, [[a0 + 0.2, a1 + 0.4, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_ppo_policy_loss_hand_computed():
    clip = 0.2
    old = torch.zeros(3, 3)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.9), math.log(0.5)], [math.log(1.1), 50.0, 50.0], [80.0] * 3])
    advantages = torch.tensor([[1.0, -2.0, -1.0], [3.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    loss, clipped = ppo_policy_loss(logprobs, old, advantages, MASK, clip)
    # token: max(-A*ratio, -A*clip(ratio)); ratio 1.5 A=1 -> max(-1.5, -1.2) = -1.2 (clipped)
    # ratio 0.9 A=-2 -> max(1.8, 1.8) = 1.8; ratio 0.5 A=-1 -> max(0.5, 0.8) = 0.8 (clipped); ratio 1.1 A=3 -> -3.3
    close(loss, -1.2 + 1.8 + 0.8 - 3.3)
    close(clipped, 2.0)
    assert torch.isfinite(loss)


def test_ppo_policy_loss_empty_mask_and_gradients():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, clipped = ppo_policy_loss(logprobs, torch.tensor([[-1.0, 70.0]]), torch.ones(1, 2), torch.zeros(1, 2), 0.2)
    close(loss, 0.0)
    close(clipped, 0.0)
    loss.backward()
    close(logprobs.grad, torch.zeros(1, 2))


def test_ppo_value_loss_hand_computed():
    clip = 0.2
    values = torch.tensor([[1.0, 0.5, 0.0], [2.0, 7.0, 7.0], [7.0, 7.0, 7.0]])
    old_values = torch.tensor([[0.5, 0.4, 0.0], [2.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.2, 0.0, 0.3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss, clipped = ppo_value_loss(values, old_values, returns, MASK, clip)
    # v=1.0 old=0.5 -> clipped 0.7; (1.0-1.2)^2=0.04 vs (0.7-1.2)^2=0.25 -> 0.25 (clipped larger)
    # v=0.5 old=0.4 -> 0.5 inside the range; 0.25 vs 0.25 -> 0.25 (tie, not counted)
    # v=0.0 old=0.0 -> 0.0; 0.09 vs 0.09; v=2.0 old=2.1 -> 2.0 inside; 4.0 vs 4.0
    close(loss, 0.5 * (0.25 + 0.25 + 0.09 + 4.0))
    close(clipped, 1.0)


def test_ppo_value_loss_empty_row_only():
    loss, clipped = ppo_value_loss(
        torch.ones(1, 2), torch.zeros(1, 2), torch.full((1, 2), 50.0), torch.zeros(1, 2), 0.2
    )
    close(loss, 0.0)
    close(clipped, 0.0)


# --------------------------------------------------------------------------------------------------------------------
# Stateful controllers
# --------------------------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_sequence_and_state_dict():
    controller = AdaptiveKLController(0.2, target=6.0, horizon=100)
    controller.update(9.0, n_steps=10)  # error 0.5 clipped to 0.2
    expected = 0.2 * (1 + 0.2 * 10 / 100)
    assert controller.value == pytest.approx(expected)
    controller.update(5.4, n_steps=10)  # error -0.1
    expected *= 1 - 0.1 * 10 / 100
    assert controller.value == pytest.approx(expected)
    controller.update(0.0, n_steps=20)  # error -1 clipped to -0.2
    expected *= 1 - 0.2 * 20 / 100
    assert controller.value == pytest.approx(expected)
    restored = AdaptiveKLController(1.0, target=6.0, horizon=100)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    restored.update(6.0, n_steps=10)  # on target: unchanged
    assert restored.value == pytest.approx(expected)


def _population_stats(xs: list[float]) -> tuple[float, float, float]:
    mean = sum(xs) / len(xs)
    return mean, sum((x - mean) ** 2 for x in xs) / len(xs), float(len(xs))


def test_running_moments_combines_batches_like_their_concatenation():
    first, second = [1.0, 2.0, 4.0], [10.0, -3.0]
    moments = RunningMoments()
    moments.update(*_population_stats(first))
    assert moments.mean == pytest.approx(7 / 3)
    assert moments.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    moments.update(*_population_stats(second))
    both = torch.tensor(first + second, dtype=torch.float64)
    assert moments.count == 5.0
    assert moments.mean == pytest.approx(both.mean().item())
    assert moments.var == pytest.approx(both.var(unbiased=False).item())
    assert moments.std == pytest.approx(both.std(unbiased=True).item())
    scores = torch.tensor([0.0, 5.0])
    close(moments.normalise(scores), (scores - both.mean().float()) / both.std().float())


def test_running_moments_state_dict_round_trip_and_empty_update():
    import json

    moments = RunningMoments()
    close(moments.normalise(torch.tensor([3.0])), [3.0])  # before any update: identity
    moments.update(2.0, 0.0, 1.0)  # one score: std 0, normalise guards the division
    assert moments.std == 0.0
    close(moments.normalise(torch.tensor([2.0])), [0.0])
    moments.update(0.0, 4.0, 3.0)  # e.g. -sqrt(6), 0, sqrt(6)
    moments.update(5.0, 1.0, 0.0)  # empty batch: no change
    state = json.loads(json.dumps(moments.state_dict()))
    restored = RunningMoments()
    restored.load_state_dict(state)
    assert restored.state_dict() == moments.state_dict()
    moments.update(1.0, 2.0, 2.0)  # 1 - sqrt(2), 1 + sqrt(2)
    restored.update(1.0, 2.0, 2.0)
    assert restored.state_dict() == pytest.approx(moments.state_dict())
    root6, root2 = math.sqrt(6.0), math.sqrt(2.0)
    everything = torch.tensor([2.0, -root6, 0.0, root6, 1 - root2, 1 + root2], dtype=torch.float64)
    assert restored.count == 6.0
    assert restored.mean == pytest.approx(everything.mean().item())
    assert restored.std == pytest.approx(everything.std().item())


def test_token_accuracy_counts_labelled_next_token_argmax_hits():
    from workers.losses import token_accuracy

    logits = torch.full((1, 4, 5), -10.0)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 1] = 10.0  # predicts 2, 3, 1 for positions 1, 2, 3
    labels = torch.tensor([[-100, 2, 4, 1]])  # position 1 right, 2 wrong, 3 right
    assert token_accuracy(logits, labels) == (2.0, 3.0)
    assert token_accuracy(logits, torch.tensor([[-100, -100, -100, 1]])) == (1.0, 1.0)  # prompts do not count
