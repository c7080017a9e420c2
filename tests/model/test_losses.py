from __future__ import annotations

import pytest
import torch

from embedcache.model.losses import dice_ce_per_prompt


@pytest.mark.parametrize("soft", [False, True])
def test_dice_ce_equals_monai_dicece(soft):
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(6, 1, 32, 32) * 3
    target = torch.rand(6, 1, 32, 32) if soft else (torch.rand(6, 1, 32, 32) > 0.8).float()
    target[0] = 0  # an empty target
    ours = dice_ce_per_prompt(logits, target)
    theirs = DiceCELoss(sigmoid=True, squared_pred=True)(logits, target)
    assert ours.shape == (6,)
    torch.testing.assert_close(ours.mean(), theirs, atol=1e-6, rtol=1e-5)


def test_loss_falls_as_prediction_improves():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    bad = dice_ce_per_prompt(torch.zeros(1, 1, 16, 16), target)
    good = dice_ce_per_prompt((target * 2 - 1) * 8, target)
    assert good.item() < 0.01 < bad.item()
