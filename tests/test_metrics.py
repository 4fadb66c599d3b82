"""pacnet.engine.metrics: confusion-matrix measures, RMSE, EPE, accumulation, all_reduce."""

import math
import os

import pytest
import torch

from pacnet.errors import DataError, PacnetValueError
from pacnet.engine.metrics import EPE, RMSE, Average, ConfusionMatrix, all_reduce_, make_metric

def test_confusion_matrix_hand_example():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred[None], label[None])
    # rows = truth: class0 {0:1, 1:1}; class1 {1:2, 0:1}; class2 {2:1, 0:1}; the 255 pixel skipped
    assert cm.counts.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    out = cm.compute()
    assert out["pixel_accuracy"] == pytest.approx(4 / 7)
    assert out["accuracy"] == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert out["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    # IoU = tp / (gt + pred - tp): 1/(2+3-1), 2/(3+3-2), 1/(2+1-1)
    assert out["iou"] == pytest.approx([1 / 4, 2 / 4, 1 / 2])
    assert out["mean_iou"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)

def test_scores_float_labels_and_batches_accumulate():
    torch.manual_seed(0)
    scores = torch.randn(4, 5, 6, 7)
    labels = torch.randint(0, 5, (4, 1, 6, 7)).float()
    labels[0, 0, 0, :] = 255
    whole = ConfusionMatrix(5)
    whole.update(scores, labels)
    parts = ConfusionMatrix(5)
    for i in range(4):
        parts.update(scores[i:i + 1], labels[i:i + 1])
    assert torch.equal(whole.counts, parts.counts)
    pred = scores.argmax(1)
    valid = labels[:, 0] != 255
    assert whole.compute()["pixel_accuracy"] == pytest.approx(
        float((pred == labels[:, 0].long())[valid].float().mean()))
    whole.reset()
    assert whole.counts.sum() == 0 and math.isnan(whole.compute()["mean_iou"])

def test_absent_classes_are_left_out_of_the_means():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    out = cm.compute()
    assert out["mean_iou"] == 1.0 and math.isnan(out["iou"][3]) and out["mean_accuracy"] == 1.0

def test_label_out_of_range_and_bad_shapes():
    cm = ConfusionMatrix(3)
    with pytest.raises(DataError, match="label value 7 is outside 0..2"):
        cm.update(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 7.0))
    with pytest.raises(PacnetValueError, match="differ in shape"):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 3, 2))
    with pytest.raises(PacnetValueError, match="4 channels for 3 classes"):
        cm.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2))

def test_rmse_is_per_image_then_averaged_with_border():
    gt = torch.zeros(2, 1, 6, 6)
    pred = torch.zeros(2, 1, 6, 6)
    pred[0] = 2.0          # image 0: rmse 2
    pred[1, :, 2:4, 2:4] = 3.0  # image 1 inside the border-1 crop: 4 of 16 pixels off by 3
    m = RMSE(border=1)
    m.update(pred, gt)
    assert m.compute()["rmse"] == pytest.approx((2.0 + math.sqrt(4 * 9 / 16)) / 2)
    pred[1, :, 0, :] = 100.0   # in the border: ignored
    m2 = RMSE(border=1)
    m2.update(pred, gt)
    assert m2.compute() == m.compute()
    with pytest.raises(PacnetValueError, match="leaves no pixels"):
        RMSE(border=3).update(pred, gt)

def test_rmse_sums_channels_like_the_pac_code():
    pred, gt = torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)
    m = RMSE()
    m.update(pred, gt)
    assert m.compute()["rmse"] == pytest.approx(math.sqrt(2.0))

def test_epe_skips_unknown_flow():
    gt = torch.zeros(1, 2, 2, 2)
    pred = torch.zeros(1, 2, 2, 2)
    pred[0, 0] = 3.0
    pred[0, 1] = 4.0  # end-point error 5 everywhere
    gt[0, :, 1, 1] = 1e10
    m = EPE()
    m.update(pred, gt)
    assert m.compute()["epe"] == pytest.approx(5.0)
    m.update(pred + torch.tensor([0.0, 1.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 2, 2))
    assert m.compute()["epe"] == pytest.approx((5.0 + math.sqrt(9 + 25)) / 2)
    with pytest.raises(PacnetValueError, match="2-channel"):
        EPE().update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))

def test_average_and_factory():
    a = Average("loss")
    a.update(torch.tensor(2.0), weight=3)
    a.update(6.0)
    assert a.compute() == {"loss": 3.0}
    assert isinstance(make_metric("miou", num_classes=3), ConfusionMatrix)
    with pytest.raises(PacnetValueError, match="did you mean 'rmse'"):
        make_metric("rmsee")

def test_all_reduce_is_a_no_op_without_distributed():
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_(t) is t and t.tolist() == [1.0, 2.0]
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    assert cm.all_reduce().counts.tolist() == [[1, 1], [0, 0]]

def test_all_reduce_sums_across_processes(tmp_path):
    """Two gloo ranks on this machine: accumulators add up."""
    import torch.multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method (spawn would re-import torch: slow)")
    mp.start_processes(_ranked, args=(2, str(tmp_path / "rdv")), nprocs=2, join=True, start_method="fork")
    results = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    for res in results:
        assert res["counts"] == [[1.0, 1.0], [0.0, 1.0]]
        assert res["rmse"] == pytest.approx(1.5)

def _ranked(rank, world, rdv):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(2)
        pred = torch.tensor([[[0, 1]]]) if rank == 0 else torch.tensor([[[1, 1]]])
        label = torch.tensor([[[0, 0]]]) if rank == 0 else torch.tensor([[[255, 1]]])
        cm.update(pred, label)
        rm = RMSE()
        rm.update(torch.full((1, 1, 2, 2), float(rank + 1)), torch.zeros(1, 1, 2, 2))
        cm.all_reduce()
        rm.all_reduce()
        torch.save({"counts": cm.counts.tolist(), "rmse": rm.compute()["rmse"]},
                   os.path.join(os.path.dirname(rdv), f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.parametrize("metric,channels", [(RMSE, 1), (EPE, 2)])
def test_clips_count_every_frame_as_an_image(metric, channels):
    # N x C x T x H x W clips measure as their N*T frames: video and frame-by-frame models
    # are compared on one scale
    g = torch.Generator().manual_seed(0)
    pred, gt = (torch.randn(2, channels, 3, 5, 6, generator=g) for _ in range(2))
    clips, frames = metric(border=1), metric(border=1)
    clips.update(pred, gt)
    frames.update(pred.transpose(1, 2).flatten(0, 1), gt.transpose(1, 2).flatten(0, 1))
    assert clips.compute() == frames.compute()
    assert clips.state[1] == 6
    with pytest.raises(PacnetValueError, match=r"N x C x T x H x W \(clips\)"):
        metric().update(pred[..., None], gt[..., None])


def test_bilinear_baseline_of_clips_is_every_frame_upsampled():
    from pacnet.engine.trainer import Evaluator

    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 3, 4, 5, generator=g)
    value_range = torch.tensor([[[2.0, 6.0]], [[1.0, 3.0]]])
    gt = torch.rand(2, 1, 3, 16, 20, generator=g) * 4 + 2
    clips = Evaluator({"metric": "rmse"}, ["pred"])
    clips.update({"pred": torch.zeros_like(gt)}, {"target": target, "target_range": value_range,
                                                  "gt_raw": gt})

    def frames(t):
        return t.transpose(1, 2).flatten(0, 1)

    per_frame = Evaluator({"metric": "rmse"}, ["pred"])
    per_frame.update({"pred": torch.zeros(6, 1, 16, 20)},
                     {"target": frames(target), "target_range": value_range.repeat_interleave(3, 0),
                      "gt_raw": frames(gt)})
    got, want = clips.compute(), per_frame.compute()
    assert got["bilinear_rmse"] == pytest.approx(want["bilinear_rmse"], rel=1e-6)
    assert got["rmse"] == pytest.approx(want["rmse"], rel=1e-12)
