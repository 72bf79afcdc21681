"""Perp-Neg: the directional interpolation weights and the perpendicular-gradient CFG combination."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import AffineDenoiser

from recipes.guidance.cfg import (
    PerpNegCondition,
    classifier_free_guidance,
    perp_neg_guidance,
    perpendicular_component,
    predict_guided_noise,
)
from recipes.guidance.closed_form import ClosedFormPrior, view_directions
from recipes.guidance.prompts import VIEW_DIRECTIONS, PromptConfig, PromptEmbeddings, perp_neg_views
from recipes.guidance.schedules import TimestepSchedule
from recipes.guidance.sds import ScoreDistillationSampling, SDSConfig

SIDE, FRONT, BACK, OVERHEAD = (VIEW_DIRECTIONS.index(d) for d in ("side", "front", "back", "overhead"))


def f(abc, r):
    a, b, c = abc
    return a * math.exp(-b * r) + c


def test_perpendicular_component_is_orthogonal_per_batch_element_and_removes_the_parallel_part():
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(3, 4, 5, 5, generator=generator)
    p = torch.randn(3, 4, 5, 5, generator=generator)
    p = perpendicular_component(p, y)  # some vector orthogonal to y
    x = torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1, 1) * y + p
    out = perpendicular_component(x, y)
    assert (out * y).sum((1, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(out, p, atol=1e-5)


def test_zero_negative_weights_give_plain_cfg_and_the_negative_term_is_perpendicular():
    generator = torch.Generator().manual_seed(1)
    eps_u, eps_pos, eps_a, eps_b = torch.randn(4, 2, 3, 4, 4, generator=generator)
    plain = classifier_free_guidance(eps_u, eps_pos, 7.5)
    zero = perp_neg_guidance(eps_u, eps_pos, [eps_a, eps_b], torch.zeros(2, 2), 7.5)
    assert torch.allclose(zero, plain)
    weights = torch.tensor([[-1.5, 0.0], [-0.3, -2.0]])
    guided = perp_neg_guidance(eps_u, eps_pos, [eps_a, eps_b], weights, 7.5)
    # the negatives change nothing along e_pos, and something across it
    assert ((guided - plain) * (eps_pos - eps_u)).sum((1, 2, 3)).abs().max() < 1e-3
    assert (guided - plain).abs().amax((1, 2, 3)).min() > 0.1


def test_predict_guided_noise_with_perp_neg_on_an_affine_denoiser_is_hand_checked():
    denoiser = AffineDenoiser(a=0.5, b=1.0)
    x_t = torch.full((2, 2), 0.2)
    t = torch.tensor([10, 10])
    positive = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    negative = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    unused = torch.full((2, 2), 9.0)
    weights = torch.tensor([[-2.0, 0.0], [-1.0, 0.0]])
    out = predict_guided_noise(
        denoiser, x_t, t, PerpNegCondition(positive, [negative, unused], weights), None, 3.0
    )
    # ε = a·x + b·c, ε_u = a·x: e_pos = c_pos, e_neg = c_neg; perp of c_neg to c_pos:
    # row 0: (1,1) − 1·(1,0) = (0,1); row 1: (0,1) − ½·(1,1) = (−½, ½)
    expected = 0.5 * x_t + 3.0 * (positive + torch.tensor([[0.0, -2.0], [0.5, -0.5]]))
    assert torch.allclose(out.guided, expected)
    assert torch.allclose(out.cond, 0.5 * x_t + positive)
    conditions = [c for _, c in denoiser.calls]
    assert not any(c is unused for c in conditions)  # a negative weighted 0 everywhere is not evaluated
    # s = 1 is no shortcut under Perp-Neg
    once = predict_guided_noise(
        denoiser, x_t, t, PerpNegCondition(positive, [negative], weights[:, :1]), None, 1.0
    )
    assert torch.allclose(once.guided, 0.5 * x_t + positive + torch.tensor([[0.0, -2.0], [0.5, -0.5]]))


def test_perp_neg_views_follow_threestudio_interpolation():
    config = PromptConfig(perp_neg=True)
    azimuth = torch.tensor([0.0, 45.0, 89.999, 90.0, 135.0, 180.0, -45.0, 315.0, 10.0])
    elevation = torch.tensor([0.0] * 8 + [75.0])
    views = perp_neg_views(config, elevation, azimuth)
    mix, index, weights = views.positive_mix, views.negative_index, views.negative_weights
    assert torch.allclose(mix.sum(-1), torch.ones(9))
    assert mix[0, FRONT] == 1 and mix[1, FRONT] == mix[1, SIDE] == 0.5 and mix[3, SIDE] == 1
    assert mix[4, SIDE] == mix[4, BACK] == 0.5 and mix[5, BACK] == 1 and mix[8, OVERHEAD] == 1
    assert torch.equal(mix[6], mix[1]) and torch.equal(mix[7], mix[1])  # |azimuth|, wrapped to ±180
    assert index[0].tolist() == [FRONT, SIDE] and index[4].tolist() == [SIDE, FRONT]
    expected = [
        (-f(config.perp_neg_f_fs, 1.0), -f(config.perp_neg_f_sf, 0.0)),
        (-f(config.perp_neg_f_fs, 0.5), -f(config.perp_neg_f_sf, 0.5)),
        (-f(config.perp_neg_f_sb, 0.5), -f(config.perp_neg_f_fsb, 0.5)),
        (-f(config.perp_neg_f_sb, 0.0), -f(config.perp_neg_f_fsb, 0.0)),
    ]
    for row, (w_first, w_second) in zip((0, 1, 4, 5), expected):
        assert weights[row].tolist() == pytest.approx([w_first, w_second], abs=1e-6)
    assert abs(weights[0, 0]) < 1e-3  # full front: no push away from front itself
    # continuous across 90°: the front negative weighs ≈ −1.57 and the side one ≈ 0 on both sides
    by_direction = [{int(i): float(w) for i, w in zip(index[row], weights[row])} for row in (2, 3)]
    assert by_direction[0][FRONT] == pytest.approx(by_direction[1][FRONT], abs=2e-3)
    assert by_direction[0][SIDE] == pytest.approx(by_direction[1][SIDE], abs=2e-3)
    assert weights[8].tolist() == [0.0, 0.0]


def test_prompt_embeddings_give_a_perp_neg_condition_when_the_flag_is_on():
    directional = (
        torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3).clone()
    )  # side 0, front 1, back 2, overhead 3
    embeddings = PromptEmbeddings(
        PromptConfig(perp_neg=True), torch.zeros(1, 2, 3), directional, torch.full((1, 2, 3), -1.0)
    )
    condition, uncondition = embeddings.for_views(torch.zeros(2), torch.tensor([45.0, 180.0]))
    assert isinstance(condition, PerpNegCondition) and uncondition.shape == (2, 2, 3)
    assert torch.allclose(condition.positive[:, 0, 0], torch.tensor([0.5, 2.0]))  # ½·front + ½·side; back
    assert torch.allclose(condition.negatives[0][:, 0, 0], torch.tensor([1.0, 0.0]))  # front; side
    assert torch.allclose(condition.negatives[1][:, 0, 0], torch.tensor([0.0, 1.0]))  # side; front
    assert condition.weights.shape == (2, 2)
    with pytest.raises(ValueError, match="perp_neg: true needs view_dependent: true"):
        PromptConfig(perp_neg=True, view_dependent=False)


def _prior() -> ClosedFormPrior:
    references = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    angles = torch.tensor([[0.0, 0.0], [0.0, 90.0], [0.0, 180.0], [0.0, 270.0]])
    return ClosedFormPrior(references, view_directions(angles))


def test_sds_with_perp_neg_on_the_closed_form_prior():
    prior = _prior()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    front = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    side = torch.tensor([[0.0, 90.0], [0.0, 90.0]])
    sds = ScoreDistillationSampling(
        prior, SDSConfig(guidance_scale=5.0, timesteps=TimestepSchedule(0.3, 0.6))
    )

    def run(condition):
        return sds(x, condition, None, generator=torch.Generator().manual_seed(3))

    plain = run(front)
    zero = run(PerpNegCondition(front, [side], torch.zeros(2, 1)))
    assert torch.allclose(zero.grad, plain.grad) and torch.equal(zero.t, plain.t)
    pushed = run(PerpNegCondition(front, [side], torch.full((2, 1), -1.5)))
    assert not torch.allclose(pushed.grad, plain.grad)
    # recompute ε_pos − ε_u on the same x_t: the Perp-Neg change of the gradient is orthogonal to it
    weight = (1 - prior.alphas_cumprod[plain.t]).view(-1, 1, 1, 1)
    x_t = _noised_like_sds(prior, x.detach(), plain.t, seed=3, batch=2)
    e_pos = prior.predict_noise(x_t, plain.t, front) - prior.predict_noise(x_t, plain.t, None)
    change = (pushed.grad - plain.grad) / weight
    cosine = torch.cosine_similarity(change.flatten(1), e_pos.flatten(1), dim=1)
    assert cosine.abs().max() < 1e-3 and change.abs().max() > 1e-3


def _noised_like_sds(prior, x0, t, seed, batch):
    from recipes.guidance.parameterization import add_noise
    from recipes.guidance.randomness import randint, randn_like

    generator = torch.Generator().manual_seed(seed)
    min_step, max_step = TimestepSchedule(0.3, 0.6).range_at(0, prior.num_train_timesteps)
    randint(min_step, max_step + 1, (batch,), x0.device, generator)  # the t draw comes first
    return add_noise(prior.alphas_cumprod, x0, randn_like(x0, generator), t)
