"""The objectives must equal their formulas (STEREO.md) on seeded random tensors."""

import torch

from stereo.attacks.inversion import denoising_loss
from stereo.erasure.objectives import (
    ESDObjective,
    Preservation,
    balanced_indices,
    erasure_loss,
    esd_target,
    preservation_loss,
    reo_target,
)


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_esd_target_matches_formula():
    e_u, e_c = seeded(3, 4, 8, 8, seed=1), seeded(3, 4, 8, 8, seed=2)
    for eta in (0.0, 1.0, 2.5):
        expected = e_u - eta * (e_c - e_u)
        torch.testing.assert_close(esd_target(e_u, e_c, eta), expected, rtol=0, atol=0)
    # eta = 0 (the reference code's negative guidance g = 2) regresses onto the unconditional prediction
    torch.testing.assert_close(esd_target(e_u, e_c, 0.0), e_u)


def test_reo_target_matches_formula_elementwise():
    B, A, N = 2, 3, 4
    e_u, e_a, e_n = seeded(B, 4, 4, 4, seed=3), seeded(A, B, 4, 4, 4, seed=4), seeded(N, B, 4, 4, 4, seed=5)
    eta_a, eta_n = 1.0, 3.0
    expected = torch.empty_like(e_u)
    for b in range(B):  # the formula written out, one latent at a time
        anchor = sum(e_a[a, b] - e_u[b] for a in range(A)) / A
        negative = sum(e_n[n, b] - e_u[b] for n in range(N)) / N
        expected[b] = e_u[b] + eta_a * anchor - eta_n * negative
    torch.testing.assert_close(reo_target(e_u, e_a, e_n, eta_a, eta_n), expected)


def test_reo_reduces_to_esd_with_one_negative_and_anchor_at_uncond():
    e_u, e_c = seeded(2, 4, 4, 4, seed=6), seeded(2, 4, 4, 4, seed=7)
    reo = reo_target(e_u, e_u[None], e_c[None], eta_a=1.0, eta_n=1.0)
    torch.testing.assert_close(reo, esd_target(e_u, e_c, 1.0))


def test_losses_are_mse():
    a, b = seeded(2, 4, 4, 4, seed=8), seeded(2, 4, 4, 4, seed=9)
    assert torch.isclose(erasure_loss(a, b), ((a - b) ** 2).mean())
    assert torch.isclose(denoising_loss(a, b), ((a - b) ** 2).mean())


def test_esd_objective_builds_one_teacher_batch_and_the_target():
    neg, unc = seeded(3, 77, 16, seed=10), seeded(77, 16, seed=11)
    obj = ESDObjective(negatives=neg, uncond=unc, eta=1.0, seed=4)
    cond = obj.sample(position=5, batch_size=2)
    drawn = balanced_indices(3, 5, 2, seed=4)  # the student's concepts: the balanced stream at positions 5, 6
    torch.testing.assert_close(cond.student, neg[drawn])
    torch.testing.assert_close(cond.uncond, unc)
    assert cond.teacher.shape == (2, 2, 77, 16)  # (∅, c) for each latent
    torch.testing.assert_close(cond.teacher[0, 1], unc)
    torch.testing.assert_close(cond.teacher[1], neg[drawn])
    eps = seeded(2, 2, 4, 4, 4, seed=12)
    torch.testing.assert_close(obj.target(eps), esd_target(eps[0], eps[1], 1.0))


def test_balanced_indices_cover_every_item_once_per_cycle():
    idx = balanced_indices(5, start=0, count=20, seed=3)
    for cycle in idx.view(4, 5):
        assert sorted(cycle.tolist()) == [0, 1, 2, 3, 4]
    # any split of the stream (steps, ranks, resumes) gives the same draws
    torch.testing.assert_close(torch.cat([balanced_indices(5, 0, 7, 3), balanced_indices(5, 7, 13, 3)]), idx)


def test_the_preservation_draw_is_balanced_over_the_kept_prompts_and_off_by_default():
    neg, unc, keep = seeded(3, 77, 16, seed=13), seeded(77, 16, seed=14), seeded(4, 77, 16, seed=15)
    assert ESDObjective(negatives=neg, uncond=unc).sample(0, 2).keep is None
    assert ESDObjective(negatives=neg, uncond=unc, preserve=Preservation(keep, 0.0)).sample(0, 2).keep is None  # λ = 0
    obj = ESDObjective(negatives=neg, uncond=unc, seed=4, preserve=Preservation(keep, 0.5))
    cond = obj.sample(position=6, batch_size=2)
    torch.testing.assert_close(cond.keep, keep[balanced_indices(4, 6, 2, seed=4 + 2)])
    # per_latent = 3: latents 6, 7 draw items 18 .. 23 of the same stream, latent-major, every prompt once per cycle
    obj.preserve.per_latent = 3
    many = obj.sample(position=6, batch_size=2).keep
    torch.testing.assert_close(many, keep[balanced_indices(4, 18, 6, seed=4 + 2)])
    drawn = obj.preserve.draw(0, 4, seed=4 + 2)  # 12 draws over 4 prompts: each 3 times
    assert sorted(int((drawn == k).all(dim=(1, 2)).sum()) for k in keep) == [3, 3, 3, 3]
    torch.testing.assert_close(cond.student, ESDObjective(negatives=neg, uncond=unc, seed=4).sample(6, 2).student)


def test_the_focused_preservation_weighs_each_kept_row_by_a_softmax_of_its_error_without_gradient_through_it():
    """lambda mean_i w_i l_i with w_i = K softmax(beta l_i / mean l) (objectives docstring); beta = 0 is lambda MSE."""
    student, teacher = seeded(6, 4, 8, 8, seed=21), seeded(6, 4, 8, 8, seed=22)
    student[2] += 3.0  # one kept row moved far more than the others
    torch.testing.assert_close(preservation_loss(student, teacher, 2.0),
                               2.0 * torch.nn.functional.mse_loss(student, teacher))
    rows = ((student - teacher) ** 2).mean(dim=(1, 2, 3))
    weights = 6 * torch.softmax(1.5 * rows / rows.mean(), dim=0)
    torch.testing.assert_close(preservation_loss(student, teacher, 2.0, focus=1.5), 2.0 * (weights * rows).mean())
    assert preservation_loss(student, teacher, 2.0, focus=1.5) > preservation_loss(student, teacher, 2.0)
    # the gradient is that of the weighted MSE with the weights held fixed: row 2 pulled back hardest
    moved = student.clone().requires_grad_(True)
    preservation_loss(moved, teacher, 2.0, focus=1.5).backward()
    by_hand = 2.0 * weights.view(6, 1, 1, 1) * 2 * (student - teacher) / (6 * 4 * 8 * 8)
    torch.testing.assert_close(moved.grad, by_hand)
    per_row = moved.grad.abs().mean(dim=(1, 2, 3)) / (student - teacher).abs().mean(dim=(1, 2, 3))
    assert int(per_row.argmax()) == 2
