from __future__ import annotations

import pytest
import torch

from embedcache.model.backbones import get_backbone, load_backbone
from embedcache.model.decoder import decode_boxes, logits_to_slice


@pytest.fixture(scope="module")
def lite_parts():
    parts, _ = load_backbone(get_backbone("litemedsam"))
    return parts


@pytest.mark.parametrize("multimask", [False, True])
def test_batched_decoding_equals_per_image_mask_decoder(lite_parts, multimask):
    torch.manual_seed(0)
    embeddings = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[30.0, 40, 90, 120], [150, 100, 200, 160]]).expand(3, 2, 4).clone()
    boxes[1] += 10
    boxes[2] -= 20
    pe, md = lite_parts.prompt_encoder, lite_parts.mask_decoder
    with torch.no_grad():
        masks, iou = decode_boxes(pe, md, embeddings, boxes, multimask_output=multimask)
        for i in range(3):
            sparse, dense = pe(points=None, boxes=boxes[i], masks=None)
            ref_masks, ref_iou = md(
                image_embeddings=embeddings[i : i + 1], image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            )
            torch.testing.assert_close(masks[i], ref_masks, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou[i], ref_iou, atol=1e-5, rtol=1e-5)
    assert masks.shape == (3, 2, 3 if multimask else 1, 256, 256)


def test_one_prompt_per_embedding_form(lite_parts):
    torch.manual_seed(1)
    embeddings = torch.randn(2, 256, 64, 64)
    boxes = torch.tensor([[30.0, 40, 90, 120], [150, 100, 200, 160]])
    with torch.no_grad():
        flat, _ = decode_boxes(lite_parts.prompt_encoder, lite_parts.mask_decoder, embeddings, boxes)
        nested, _ = decode_boxes(lite_parts.prompt_encoder, lite_parts.mask_decoder, embeddings, boxes[:, None])
    assert flat.shape == (2, 1, 256, 256)
    torch.testing.assert_close(flat, nested[:, 0])


def test_logits_to_slice_shape():
    out = logits_to_slice(torch.zeros(2, 3, 1, 256, 256), input_size=256, slice_size=512)
    assert out.shape == (2, 3, 1, 512, 512)


def test_multimask_segmentation_keeps_the_output_with_the_highest_predicted_iou(lite_parts):
    from embedcache.model.decoder import decode_boxes, masks_on_grid, segment_boxes

    torch.manual_seed(0)
    embeddings = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [100.0, 90.0, 200.0, 230.0], [5.0, 5.0, 250.0, 250.0]])
    pe, md = lite_parts.prompt_encoder, lite_parts.mask_decoder
    with torch.no_grad():
        masks, iou = segment_boxes(pe, md, embeddings, boxes, input_size=256, slice_size=256, shape_yx=(256, 256),
                                   multimask=True)
        low, all_iou = decode_boxes(pe, md, embeddings, boxes, multimask_output=True)
    best = all_iou.argmax(dim=1)
    assert all_iou.shape == (3, 3)
    torch.testing.assert_close(iou, all_iou.max(dim=1).values)
    for i in range(3):
        want = masks_on_grid(low[i : i + 1, best[i] : best[i] + 1], input_size=256, slice_size=256, shape_yx=(256, 256))
        assert torch.equal(masks[i], want[0])


@pytest.mark.parametrize("with_box", [True, False])
def test_points_decode_as_sam_predictor_does_per_sample(lite_parts, with_box):
    """Box + clicks (and clicks alone) through the batched decoder equal segment_anything's SamPredictor,
    one prompt at a time, with prompts of different click counts decoded side by side."""
    import numpy as np
    from segment_anything import SamPredictor
    from segment_anything.modeling import Sam

    from embedcache.model.decoder import segment_boxes

    torch.manual_seed(3)
    embeddings = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[30.0, 40, 190, 220], [150, 100, 400, 360], [10, 10, 500, 500]])  # on a 512² slice
    if not with_box:
        boxes[:] = float("nan")
    points = [np.array([[100.0, 120, 1]]), np.array([[200.0, 150, 1], [380, 300, 0], [250, 200, 1]]),
              np.array([[60.0, 70, 0], [300, 300, 1]])]
    pe, md = lite_parts.prompt_encoder, lite_parts.mask_decoder
    sam = Sam(image_encoder=torch.nn.Identity(), prompt_encoder=pe, mask_decoder=md)
    sam.image_encoder.img_size = 256  # SamPredictor's transform reads it (LiteMedSAM's input: 256 px)
    predictor = SamPredictor(sam)
    with torch.no_grad():
        masks, iou = segment_boxes(pe, md, embeddings, boxes, input_size=256, slice_size=512, shape_yx=(512, 512),
                                   points=points)
        for i in range(3):
            predictor.features, predictor.is_image_set = embeddings[i : i + 1], True
            predictor.original_size, predictor.input_size = (512, 512), (256, 256)
            theirs, their_iou, _ = predictor.predict(point_coords=points[i][:, :2], point_labels=points[i][:, 2],
                                                     box=boxes[i].numpy() if with_box else None, multimask_output=False)
            assert np.array_equal(masks[i].numpy(), theirs[0])
            assert abs(float(iou[i]) - float(their_iou[0])) < 1e-5


def test_the_previous_mask_as_a_prompt_equals_sam_predictors_mask_input(lite_parts):
    """The mask prompt (the last round's low-resolution logits, fed back with a click as SAM, SAM-Med3D and MedSAM2
    do) goes through SAM's own mask downscaling, batched: each prompt equals SamPredictor.predict(mask_input=...)
    on its embedding, and the mask prompt changes the result (it is not dropped)."""
    from segment_anything.modeling import Sam
    from segment_anything.predictor import SamPredictor

    class Encoder(torch.nn.Module):  # SamPredictor asks only the encoder's input size; the features are given
        img_size = 256

    torch.manual_seed(0)
    pe, md = lite_parts.prompt_encoder, lite_parts.mask_decoder
    embeddings = torch.randn(2, 256, 64, 64)
    boxes = torch.tensor([[[30.0, 40, 90, 120], [150, 100, 200, 160]], [[60.0, 60, 120, 140], [20, 20, 80, 90]]])
    coords = torch.tensor([[[[50.0, 70]], [[170, 130]]], [[[90.0, 100]], [[40, 50]]]])
    labels = torch.tensor([[[1], [0]], [[1], [1]]])
    previous = torch.randn(2, 2, 1, 256, 256) * 4
    predictor = SamPredictor(Sam(image_encoder=Encoder(), prompt_encoder=pe, mask_decoder=md))
    with torch.no_grad():
        masks, iou = decode_boxes(pe, md, embeddings, boxes, points=(coords, labels), masks=previous)
        without, _ = decode_boxes(pe, md, embeddings, boxes, points=(coords, labels))
        for i in range(2):
            predictor.features, predictor.is_image_set = embeddings[i : i + 1], True
            predictor.original_size = predictor.input_size = (256, 256)
            for j in range(2):
                _, ref_iou, ref_low = predictor.predict_torch(
                    coords[i, j][None], labels[i, j][None], boxes=boxes[i, j][None], mask_input=previous[i, j][None],
                    multimask_output=False, return_logits=True)
                torch.testing.assert_close(masks[i, j], ref_low[0], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(iou[i, j], ref_iou[0], atol=1e-5, rtol=1e-5)
    assert (masks - without).abs().max() > 0.1


def test_segment_boxes_gives_back_and_takes_the_previous_logits(lite_parts):
    """The one segmenter's path (segment_boxes, as Segmenter calls it): with ``low_res`` it returns the kept output's
    logits, and ``previous`` reaches decode_boxes's mask prompt per prompt, in a batch that mixes click counts."""
    import numpy as np

    from embedcache.model.decoder import segment_boxes

    torch.manual_seed(1)
    pe, md = lite_parts.prompt_encoder, lite_parts.mask_decoder
    embeddings = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[10.0, 12, 40, 44], [20, 18, 50, 60], [5, 8, 30, 30]])
    points = [None, np.array([[30, 40, 1]], np.float32), None]
    previous = torch.randn(3, 1, 256, 256) * 4
    kw = dict(input_size=256, slice_size=64, shape_yx=(64, 64))
    with torch.no_grad():
        masks, iou, low = segment_boxes(pe, md, embeddings, boxes, points=points, previous=previous, low_res=True, **kw)
        plain, _, plain_low = segment_boxes(pe, md, embeddings, boxes, points=points, low_res=True, **kw)
        for i in range(3):
            clicks = None
            if points[i] is not None:
                clicks = (torch.from_numpy(points[i][None, :, :2]) * 4, torch.from_numpy(points[i][None, :, 2]))
            ref, ref_iou = decode_boxes(pe, md, embeddings[i : i + 1], boxes[i : i + 1] * 4, points=clicks,
                                        masks=previous[i : i + 1])
            torch.testing.assert_close(low[i], ref[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou[i], ref_iou[0, 0], atol=1e-5, rtol=1e-5)
    assert low.shape == (3, 1, 256, 256) and masks.shape == (3, 64, 64)
    assert (low - plain_low).abs().max() > 0.1  # the mask prompt is used, not dropped
