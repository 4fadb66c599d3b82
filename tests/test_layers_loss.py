"""Losses and accuracy layers against direct formulas of Caffe's semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layer_helpers import build, defaults, infer, layer_error, make_spec, run_layer, rand
from pacnet.errors import DataError, SchemaError, ShapeError
from pacnet.registry import get

D = torch.float64
FLT_MIN = np.float32(np.finfo(np.float32).tiny).item()



def labels(shape, classes, seed=0, ignore=None, frac=0.3):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, classes, shape, generator=g).to(D)
    if ignore is not None:
        lab[torch.rand(shape, generator=g) < frac] = ignore
    return lab




# ----------------------------------------------------------------------------- SoftmaxWithLoss

def softmax_loss_ref(scores, label, axis=1, ignore=None, normalization="VALID"):
    """Caffe's SoftmaxWithLoss forward as a plain loop in numpy (float64)."""
    s = np.moveaxis(scores.detach().numpy(), axis, -1)
    outer = int(np.prod(scores.shape[:axis]))
    inner = int(np.prod(scores.shape[axis + 1:]))
    s = s.reshape(-1, s.shape[-1])
    lab = label.numpy().reshape(-1)
    loss, count = 0.0, 0
    for row, lv in zip(s, lab):
        lv = int(lv)
        if ignore is not None and lv == ignore:
            continue
        p = np.exp(row - row.max())
        p /= p.sum()
        loss -= math.log(max(p[lv], FLT_MIN))
        count += 1
    norm = {"FULL": outer * inner, "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[normalization]
    return loss / max(1.0, norm)


@pytest.mark.parametrize("normalization", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("ignore", [None, 255, 1])
def test_softmax_loss_normalizations(normalization, ignore):
    scores = rand(2, 4, 3, 5)
    lab = labels((2, 1, 3, 5), 4, seed=1, ignore=ignore)
    params = {"normalization": normalization}
    if ignore is not None:
        params["ignore_label"] = ignore
    (loss,) = run_layer(make_spec("SoftmaxWithLoss", n_bottoms=2, **params), scores, lab)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(softmax_loss_ref(scores, lab, ignore=ignore, normalization=normalization),
                                        rel=1e-12)


@pytest.mark.parametrize("scores_shape,label_shape,axis", [
    ((6, 5), (6,), 1), ((6, 5), (6, 1), 1), ((2, 3, 4, 4), (2, 4, 4), 1), ((2, 4, 3), (2, 4), 2),
    ((3, 2, 5, 2), (3, 2, 2), -2), ((5, 3), (3,), 0),
])
def test_softmax_loss_shapes_and_axis(scores_shape, label_shape, axis):
    scores = rand(*scores_shape)
    a = axis % len(scores_shape)
    lab = labels(label_shape, scores_shape[a], seed=2)
    (loss,) = run_layer(make_spec("SoftmaxWithLoss", n_bottoms=2, axis=axis), scores, lab)
    assert loss.item() == pytest.approx(softmax_loss_ref(scores, lab, axis=a), rel=1e-12)


def test_softmax_loss_default_is_valid_and_deprecated_normalize():
    scores, lab = rand(2, 3, 4, 4), labels((2, 1, 4, 4), 3, seed=3, ignore=255)
    spec = make_spec("SoftmaxWithLoss", n_bottoms=2, ignore_label=255)
    assert spec["normalization"] == "VALID"
    valid = run_layer(spec, scores, lab)[0].item()
    assert valid == pytest.approx(softmax_loss_ref(scores, lab, ignore=255, normalization="VALID"))
    # FCN's normalize: false -> BATCH_SIZE (a summed loss over pixels, divided by N).
    summed = run_layer(make_spec("SoftmaxWithLoss", n_bottoms=2, ignore_label=255, normalize=False), scores, lab)[0].item()
    assert summed == pytest.approx(softmax_loss_ref(scores, lab, ignore=255, normalization="BATCH_SIZE"))
    assert run_layer(make_spec("SoftmaxWithLoss", n_bottoms=2, ignore_label=255, normalize=True), scores, lab)[0].item() == \
        pytest.approx(valid)
    # A written normalization wins over the deprecated flag.
    full = run_layer(make_spec("SoftmaxWithLoss", n_bottoms=2, ignore_label=255, normalize=False, normalization="FULL"),
                     scores, lab)[0].item()
    assert full == pytest.approx(softmax_loss_ref(scores, lab, ignore=255, normalization="FULL"))


def test_softmax_loss_flt_min_clamp_and_unclamped_gradient():
    scores = torch.tensor([[0.0, 1000.0], [2.0, 1.0]], dtype=D, requires_grad=True)
    lab = torch.tensor([0.0, 0.0], dtype=D)
    (loss,) = run_layer(make_spec("SoftmaxWithLoss", n_bottoms=2, normalization="NONE"), scores, lab)
    p1 = math.exp(2) / (math.exp(2) + math.exp(1))
    assert loss.item() == pytest.approx(-math.log(FLT_MIN) - math.log(p1), rel=1e-12)
    loss.backward()
    p = torch.softmax(scores.detach(), 1)
    onehot = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    torch.testing.assert_close(scores.grad, p - onehot)      # Caffe's backward ignores the clamp


def test_softmax_loss_gradient_is_caffes_and_gradcheck():
    scores = rand(2, 3, 2, 3).requires_grad_(True)
    lab = labels((2, 1, 2, 3), 3, seed=4, ignore=255, frac=0.4)
    spec = make_spec("SoftmaxWithLoss", n_bottoms=2, ignore_label=255)
    m = build(spec, scores.shape, lab.shape, dtype=D)
    m(scores, lab).backward()
    valid = (lab != 255).reshape(2, 1, 2, 3)
    onehot = torch.nn.functional.one_hot(torch.where(valid, lab.reshape(2, 1, 2, 3), 0).long().squeeze(1), 3)
    expected = (torch.softmax(scores.detach(), 1) - onehot.permute(0, 3, 1, 2)) * valid / valid.sum()
    torch.testing.assert_close(scores.grad, expected)
    assert torch.autograd.gradcheck(lambda s: m(s, lab), (scores.detach().clone().requires_grad_(True),))


def test_softmax_loss_float_labels_truncate_and_second_top():
    scores = rand(3, 4)
    lab_f = torch.tensor([1.9, 0.2, 3.99], dtype=D)
    spec = make_spec("SoftmaxWithLoss", n_bottoms=2, n_tops=2)
    loss, prob = run_layer(spec, scores, lab_f)
    (ref,) = run_layer(make_spec("SoftmaxWithLoss", n_bottoms=2), scores, torch.tensor([1, 0, 3]))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(prob, torch.softmax(scores, 1))


def test_softmax_loss_all_ignored_is_zero_not_nan():
    (loss,) = run_layer(make_spec("SoftmaxWithLoss", n_bottoms=2, ignore_label=255), rand(2, 3), torch.full((2,), 255.0, dtype=D))
    assert loss.item() == 0.0


def test_softmax_loss_errors():
    spec = make_spec("SoftmaxWithLoss", n_bottoms=2, ignore_label=255)
    with layer_error("label value 3 is outside", cls=DataError):
        run_layer(spec, rand(2, 3, 2, 2), torch.tensor([[[[0, 1], [3, 255]]], [[[0, 0], [0, 0]]]], dtype=D))
    with layer_error("label value -1", cls=DataError):
        run_layer(make_spec("SoftmaxWithLoss", n_bottoms=2), rand(2, 3), torch.tensor([-1.0, 0.0], dtype=D))
    with layer_error("elements", cls=ShapeError):
        infer(spec, (2, 3, 4, 4), (2, 1, 4, 5))
    with layer_error(cls=SchemaError):
        make_spec("SoftmaxWithLoss", n_bottoms=2, normalization="MEAN")
    with layer_error(cls=SchemaError):
        make_spec("SoftmaxWithLoss", n_bottoms=1)


# ----------------------------------------------------------------------------- EuclideanLoss

def test_euclidean_loss_value_and_gradcheck():
    a, b = rand(4, 3, 2), rand(4, 6, seed=1)
    (loss,) = run_layer(make_spec("EuclideanLoss", n_bottoms=2), a, b)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(((a.reshape(4, 6) - b) ** 2).sum().item() / 4 / 2)
    m = build(make_spec("EuclideanLoss", n_bottoms=2), a.shape, b.shape, dtype=D)
    assert torch.autograd.gradcheck(m, (a.requires_grad_(True), b.requires_grad_(True)))


def test_euclidean_loss_shape_error():
    with layer_error("same first dim and count", cls=ShapeError):
        infer(make_spec("EuclideanLoss", n_bottoms=2), (4, 3), (4, 4))
    with layer_error("same first dim and count", cls=ShapeError):
        infer(make_spec("EuclideanLoss", n_bottoms=2), (4, 3), (3, 4))


# ----------------------------------------------------------------------------- SigmoidCrossEntropyLoss

def bce_ref(x, t, ignore=None):
    x, t = x.numpy().ravel(), t.numpy().ravel()
    total, count = 0.0, 0
    for xi, ti in zip(x, t):
        if ignore is not None and int(ti) == ignore:
            continue
        p = 1 / (1 + math.exp(-xi))
        total -= ti * math.log(p) + (1 - ti) * math.log(1 - p)
        count += 1
    return total, count


def test_sigmoid_cross_entropy_normalizations():
    x = rand(3, 4, 2) * 3
    t = torch.rand((3, 4, 2), generator=torch.Generator().manual_seed(1), dtype=D)
    total, _ = bce_ref(x, t)
    spec = make_spec("SigmoidCrossEntropyLoss", n_bottoms=2)
    assert run_layer(spec, x, t)[0].item() == pytest.approx(total / 3, rel=1e-12)      # BATCH_SIZE default
    assert run_layer(make_spec("SigmoidCrossEntropyLoss", n_bottoms=2, normalization="FULL"), x, t)[0].item() == \
        pytest.approx(total / 24, rel=1e-12)
    assert run_layer(make_spec("SigmoidCrossEntropyLoss", n_bottoms=2, normalize=True), x, t)[0].item() == \
        pytest.approx(total / 24, rel=1e-12)                                             # VALID, nothing ignored
    tb = (t > 0.5).to(D)
    tb[0, 0, 0] = tb[1, 2, 1] = -1
    total_i, count = bce_ref(x, tb, ignore=-1)
    spec = make_spec("SigmoidCrossEntropyLoss", n_bottoms=2, ignore_label=-1, normalization="VALID")
    assert run_layer(spec, x, tb)[0].item() == pytest.approx(total_i / count, rel=1e-12)
    m = build(spec, x.shape, tb.shape, dtype=D)
    assert torch.autograd.gradcheck(lambda inp: m(inp, tb), (x.clone().requires_grad_(True),))


def test_sigmoid_cross_entropy_count_error():
    with layer_error("same count", cls=ShapeError):
        infer(make_spec("SigmoidCrossEntropyLoss", n_bottoms=2), (2, 3), (2, 4))


# ----------------------------------------------------------------------------- Accuracy

def accuracy_ref(scores, label, top_k, axis=1, ignore=None):
    s = np.moveaxis(scores.numpy(), axis, -1).reshape(-1, scores.shape[axis])
    lab = label.numpy().reshape(-1)
    c = scores.shape[axis]
    right, count = 0, 0
    per_right, per_count = np.zeros(c), np.zeros(c)
    for row, lv in zip(s, lab):
        lv = int(lv)
        if ignore is not None and lv == ignore:
            continue
        better = sum(1 for v in row if v >= row[lv]) - 1
        ok = better < top_k
        right += ok
        count += 1
        per_count[lv] += 1
        per_right[lv] += ok
    per = np.where(per_count > 0, per_right / np.maximum(per_count, 1), 0.0)
    return (right / count if count else 0.0), per


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("ignore", [None, 0])
def test_accuracy_top_k_with_ties(top_k, ignore):
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 3, (4, 4, 3, 2), generator=g).to(D)          # many ties: they count against
    lab = labels((4, 1, 3, 2), 4, seed=6)
    params = {"top_k": top_k} if ignore is None else {"top_k": top_k, "ignore_label": ignore}
    acc, per = run_layer(make_spec("Accuracy", n_bottoms=2, n_tops=2, **params), scores, lab)
    ref_acc, ref_per = accuracy_ref(scores, lab, top_k, ignore=ignore)
    assert acc.shape == () and acc.item() == pytest.approx(ref_acc)
    np.testing.assert_allclose(per.numpy(), ref_per)


def test_accuracy_axis_and_single_top():
    scores = rand(3, 5, 4)
    lab = labels((3, 5), 4, seed=7)
    (acc,) = run_layer(make_spec("Accuracy", n_bottoms=2, axis=2), scores, lab)
    assert acc.item() == pytest.approx(accuracy_ref(scores, lab, 1, axis=2)[0])
    assert not get("Accuracy").loss


def test_accuracy_errors():
    with layer_error("top_k 5 exceeds", cls=ShapeError):
        infer(make_spec("Accuracy", n_bottoms=2, top_k=5), (2, 4), (2,))
    with layer_error("elements", cls=ShapeError):
        infer(make_spec("Accuracy", n_bottoms=2), (2, 4), (3,))
    with layer_error("outside", cls=DataError):
        run_layer(make_spec("Accuracy", n_bottoms=2), rand(2, 4), torch.tensor([4.0, 0.0], dtype=D))


# ----------------------------------------------------------------------------- SegAccuracy

def seg_inputs(pairs, classes, ignore_pixels=0, ignore_value=255):
    """Scores/labels (N=1, H=1, W=len) realising the given (gt, pred) pairs."""
    gts = [g for g, _ in pairs] + [ignore_value] * ignore_pixels
    preds = [p for _, p in pairs] + [0] * ignore_pixels
    w = len(gts)
    scores = torch.zeros(1, classes, 1, w, dtype=D)
    for i, p in enumerate(preds):
        scores[0, p, 0, i] = 1.0
    label = torch.tensor(gts, dtype=D).reshape(1, 1, 1, w)
    return scores, label


PAIRS = [(0, 0)] * 3 + [(0, 1)] + [(1, 1)] * 2 + [(2, 0)]     # CM = [[3,1,0],[0,2,0],[1,0,0]]


def test_seg_accuracy_hand_made_confusion_matrix():
    scores, label = seg_inputs(PAIRS, 3, ignore_pixels=2)
    spec = make_spec("SegAccuracy", n_bottoms=2, ignore_label=255)
    m = build(spec, scores.shape, label.shape, dtype=D)
    (y,) = run_layer(spec, scores, label, module=m)
    assert y.shape == (1, 1, 1, 3)
    assert m.confusion.tolist() == [[3, 1, 0], [0, 2, 0], [1, 0, 0]]
    acc, recall, iou = y.flatten().tolist()
    assert acc == pytest.approx(5 / 7)
    assert recall == pytest.approx((3 / 4 + 2 / 2 + 0 / 1) / 3)
    assert iou == pytest.approx((3 / 5 + 2 / 3 + 0) / 3)


def test_seg_accuracy_absent_class_counts_one_in_iou_and_not_in_recall():
    scores, label = seg_inputs(PAIRS, 4)
    (y,) = run_layer(make_spec("SegAccuracy", n_bottoms=2), scores, label)
    acc, recall, iou = y.flatten().tolist()
    assert recall == pytest.approx((3 / 4 + 1 + 0) / 3)
    assert iou == pytest.approx((3 / 5 + 2 / 3 + 0 + 1) / 4)                # DeepLab's avgJaccard quirk


def test_seg_accuracy_reset_semantics_and_multiple_ignore_labels():
    s1, l1 = seg_inputs([(0, 0), (1, 0)], 2)
    s2, l2 = seg_inputs([(1, 1), (1, 1), (0, 1)], 2)
    spec = make_spec("SegAccuracy", n_bottoms=2)
    m = build(spec, s1.shape, l1.shape, dtype=D)
    m(s1, l1)
    assert m(s2, l2)[0, 0, 0, 0].item() == pytest.approx(2 / 3)             # reset: only the last batch
    spec = make_spec("SegAccuracy", n_bottoms=2, reset=False)
    m = build(spec, s1.shape, l1.shape, dtype=D)
    m(s1, l1)
    assert m(s2, l2)[0, 0, 0, 0].item() == pytest.approx(3 / 5)             # accumulated
    assert m.confusion.tolist() == [[1, 1], [1, 2]]
    m.clear()
    assert m(s1, l1)[0, 0, 0, 0].item() == pytest.approx(1 / 2)
    spec = make_spec("SegAccuracy", n_bottoms=2, ignore_label=[1, 7])
    s3, l3 = seg_inputs([(0, 0), (1, 0), (0, 1)], 2, ignore_pixels=1, ignore_value=7)
    assert run_layer(spec, s3, l3)[0][0, 0, 0, 0].item() == pytest.approx(1 / 2)


def test_seg_accuracy_ties_go_to_larger_class_and_3d_label():
    scores = torch.tensor([[1.0, 0.0, 1.0]], dtype=D).reshape(1, 3, 1, 1)
    spec = make_spec("SegAccuracy", n_bottoms=2)
    (y,) = run_layer(spec, scores, torch.tensor([[[2.0]]], dtype=D))        # label N x H x W
    assert y[0, 0, 0, 0].item() == 1.0


def test_seg_accuracy_errors():
    spec = make_spec("SegAccuracy", n_bottoms=2, ignore_label=255)
    with layer_error("does not match", cls=ShapeError):
        infer(spec, (2, 3, 4, 4), (2, 1, 4, 5))
    with layer_error("N x C x H x W", cls=ShapeError):
        infer(spec, (2, 3, 4), (2, 1, 4))
    scores, label = seg_inputs([(0, 0), (3, 1)], 3)
    with layer_error("label value 3", cls=DataError):
        run_layer(spec, scores, label)
