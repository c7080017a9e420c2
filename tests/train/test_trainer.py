"""The trainable model and its step: only the mask decoder learns, micro-batches add up to the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedcache.config import FinetuneConfig
from embedcache.train.trainer import build_trainer

from conftest import small_batch


def _trainer(backbone, *, micro_batch: int = 0, **changes):
    """The factory's trainer for the tiny model, at lr 1e-3 with a schedule long enough to be flat here."""
    config = FinetuneConfig(lr=1e-3, micro_batch=micro_batch, warmup_fraction=0.0, device="cpu", **changes)
    return build_trainer(backbone, None, config, device=torch.device("cpu"), total_steps=10_000)


def test_only_the_mask_decoder_receives_gradients_and_loss_falls(tiny_model, small_cache):
    batch, _ = small_batch(tiny_model, small_cache)
    trainer = _trainer(tiny_model)
    model, params = trainer.model, trainer.step.params
    losses = []
    for _ in range(6):
        trainer.step(batch, len(batch.boxes))
        losses.append(trainer.step.end_epoch()[0])
    assert losses[-1] < 0.7 * losses[0]
    decoder = model.mask_decoder
    assert {id(p) for p in params} <= {id(p) for p in decoder.parameters()}
    assert all(p.grad is not None for p in params)  # everything trainable is reached by the loss
    assert all(p.grad is not None for p in decoder.transformer.parameters())
    assert decoder.mask_tokens.weight.grad is not None and decoder.output_upscaling[0].weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in model.prompt_encoder.parameters())
    assert not any(name.startswith("image_encoder") for name, _ in model.named_parameters())  # never even built
    assert {id(p) for p in trainer.optimizer.param_groups[0]["params"]} == {id(p) for p in params}


def test_micro_batches_add_up_to_the_whole_batch_step(tiny_model, small_cache):
    batch, _ = small_batch(tiny_model, small_cache)
    weights = []
    for micro in (0, 3):
        trainer = _trainer(tiny_model, micro_batch=micro)
        trainer.step(batch, len(batch.boxes))
        grads = {n: p.grad.clone() for n, p in trainer.model.mask_decoder.named_parameters() if p.requires_grad}
        weights.append(grads)
        assert trainer.step.end_epoch()[1] == len(batch.boxes)
    # float32 summation noise is relative to the whole step's gradients: a key projection's bias gets an exact zero
    # (softmax ignores a shift of every key alike), so its two sums are both noise of ~1e-10
    scale = max(float(g.abs().max()) for g in weights[0].values())
    for key in weights[0]:  # the gradients the optimizer stepped on, equal up to summation order
        whole, parts_sum = weights[0][key], weights[1][key]
        assert (whole - parts_sum).abs().max() <= 1e-4 * whole.abs().max() + 1e-6 * scale, key


def test_the_iou_head_learns_only_when_asked_and_its_loss_is_the_squared_error_to_the_true_iou(tiny_model, small_cache):
    from embedcache.model.losses import iou_mse_per_prompt, mask_iou

    batch, _ = small_batch(tiny_model, small_cache)
    head = lambda trainer: trainer.model.mask_decoder.iou_prediction_head  # noqa: E731
    frozen, trained = _trainer(tiny_model, iou_head=False), _trainer(tiny_model, iou_head=True)
    for trainer in (frozen, trained):
        trainer.step(batch, len(batch.boxes))
    assert all(p.grad is None for p in head(frozen).parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head(trained).parameters())
    logits = torch.tensor([[[[5.0, 5.0], [-5.0, -5.0]]]])  # the top row predicted
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # the left column true: IoU 1/3
    assert mask_iou(logits, target).item() == pytest.approx(1 / 3)
    assert iou_mse_per_prompt(torch.tensor([[0.5]]), logits, target).item() == pytest.approx((0.5 - 1 / 3) ** 2)


def test_an_adapter_starts_as_the_identity_and_learns_with_the_decoder(tiny_model, small_cache):
    batch, _ = small_batch(tiny_model, small_cache)
    plain, adapted = _trainer(tiny_model), _trainer(tiny_model, adapter=True)
    adapted.model.mask_decoder.load_state_dict(plain.model.mask_decoder.state_dict(), strict=False)
    with torch.no_grad():
        before = [t.model(batch.embeddings, batch.boxes)[0] for t in (plain, adapted)]
    torch.testing.assert_close(before[0], before[1])  # a new adapter changes nothing
    adapted.step(batch, len(batch.boxes))
    adapter = adapted.model.mask_decoder.adapter
    assert all(p.grad is not None for p in adapter.parameters()) and adapter.up.weight.grad.abs().sum() > 0
    assert {k for k in adapted.decoder_state() if k.startswith("adapter.")}  # saved with the decoder
    with torch.no_grad():
        after = adapted.model(batch.embeddings, batch.boxes)[0]
    assert not torch.allclose(after, before[1])


@pytest.mark.parametrize("resident", ["device", "stream"])
def test_a_refinement_head_learns_from_the_slices_pixels_with_the_decoder(tiny_model, small_cache, resident):
    batch, _ = small_batch(tiny_model, small_cache, pixels=True, resident=resident)
    assert batch.pixels is not None and batch.pixels.shape == batch.masks.shape and batch.pixels.dtype == torch.uint8
    refined = _trainer(tiny_model, refine_head=True)
    head = refined.model.mask_decoder.refiner
    refined.step(batch, len(batch.boxes))
    assert all(p.grad is not None for p in head.parameters()) and head.out.weight.grad.abs().sum() > 0
    assert {k for k in refined.decoder_state() if k.startswith("refiner.")}  # saved with the decoder
    assert {id(p) for p in head.parameters()} <= {id(p) for p in refined.step.params}


def test_prompts_with_clicks_train_in_groups_whose_gradients_add_up_to_one_prompt_at_a_time(tiny_model, small_cache):
    """Box, box + clicks and clicks-alone prompts in one batch: grouped by kind (SAM takes one point count
    per call), each prompt gets its own clicks and target, so the step equals one forward per prompt."""
    from embedcache.train.data import Clicks

    batch, _ = small_batch(tiny_model, small_cache)
    n = len(batch.boxes)
    assert n >= 3
    count = np.array([2, 0, 3] + [1] * (n - 3))
    box = np.array([True, True, False] + [True] * (n - 3))
    batch.clicks = Clicks(count=count, box=box, seeds=torch.arange(n) + 11)
    grads, losses = [], []
    for micro in (0, 1):
        trainer = _trainer(tiny_model, micro_batch=micro)
        calls = []
        forward = trainer.step.net.forward
        trainer.step.net.forward = lambda e, b, p=None: (calls.append((b is not None, 0 if p is None else p[0].shape[1],
                                                                         len(e))), forward(e, b, p))[1]
        trainer.step(batch, n)
        grads.append({k: p.grad.clone() for k, p in trainer.model.mask_decoder.named_parameters() if p.requires_grad})
        losses.append(trainer.step.end_epoch()[0])
        if micro == 0:  # one no-grad forward for each group with a box and points, then one per group
            kinds = {(b, k) for b, k in zip(box.tolist(), count.tolist())}
            assert sorted(c[:2] for c in calls if c[1] > 0) == sorted((b, k) for b, k in kinds if k > 0)
            assert len(calls) == len(kinds) + sum(1 for b, k in kinds if b and k > 0)
    assert abs(losses[0] - losses[1]) < 1e-5
    scale = max(float(g.abs().max()) for g in grads[0].values())
    for key in grads[0]:  # equal up to summation order (some tensors' gradients are float noise, ~1e-11)
        assert (grads[0][key] - grads[1][key]).abs().max() <= 1e-4 * scale, key


@pytest.mark.parametrize("round_loss", ["every", "last"])
def test_interactive_rounds_feed_back_the_logits_and_add_one_click_a_round(tiny_model, small_cache, round_loss):
    """--prompts interactive: the first round has the box alone, each next one the round before's logits as the
    mask prompt and one more click where it adds one (none on the last round, nor on one in the middle), every
    round with the box; the loss's rounds go through the trained module with gradients, the others without."""
    from embedcache.train.data import Clicks

    batch, _ = small_batch(tiny_model, small_cache)
    n = len(batch.boxes)
    batch.clicks = Clicks(count=np.ones(n, np.int64), box=np.ones(n, bool), seeds=torch.arange(n) + 5)
    trainer = _trainer(tiny_model, micro_batch=64, prompts="interactive", rounds=6, round_loss=round_loss)
    calls, seen = [], []
    for module in {id(trainer.step.net): trainer.step.net, id(trainer.step.plain): trainer.step.plain}.values():
        forward = module.forward

        def spy(e, b, p=None, m=None, forward=forward):
            out = forward(e, b, p, m)
            calls.append((0 if p is None else p[0].shape[1], m is not None, torch.is_grad_enabled()))
            if m is not None:
                assert any(torch.equal(m, s) for s in seen)  # a logits tensor an earlier round gave
            seen.append(out[0].detach().float())
            return out

        module.forward = spy
    trainer.step(batch, n)
    loss, _, bad = trainer.step.end_epoch()
    assert bad is None and np.isfinite(loss)
    counts = [c for c, _, _ in calls]
    assert counts[0] == 0 and not calls[0][1] and all(m for _, m, _ in calls[1:])
    assert len(calls) == 6 and counts[-1] == counts[-2] and counts[-2] == 3  # 6 rounds: 3 clicks, 2 rounds without
    assert all(b - a in (0, 1) for a, b in zip(counts, counts[1:]))
    graded = [g for _, _, g in calls]
    assert graded == ([True] * 6 if round_loss == "every" else [False] * 5 + [True])
    grads = [p.grad for p in trainer.model.mask_decoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
