"""Losses, the optimizer and the schedules against slow, written-out references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mbert_retrieval.models.colbert import maxsim
from mbert_retrieval.training import losses
from mbert_retrieval.training.optim import BatchSizeWarmup, StableAdamW, WarmupStableDecay


def test_info_nce_is_cross_entropy_over_all_documents():
    torch.manual_seed(0)
    scores, targets = torch.randn(5, 12), torch.tensor([0, 3, 5, 7, 11])
    expected = sum(
        -math.log(math.exp(scores[i, targets[i]] / 0.1) / sum(math.exp(s / 0.1) for s in scores[i].tolist()))
        for i in range(5)
    )
    assert losses.info_nce(scores, targets, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_pad_packed_and_group_rows():
    values = torch.arange(7.0)[:, None]
    padded, mask = losses.pad_packed(values, torch.tensor([0, 2, 3, 7], dtype=torch.int32), 5)
    assert padded[..., 0].tolist() == [[0, 1, 0, 0, 0], [2, 0, 0, 0, 0], [3, 4, 5, 6, 0]]
    assert mask.sum(1).tolist() == [2, 1, 4]
    rows, valid = losses.group_rows(torch.arange(6.0), torch.tensor([0, 1, 4, 6]), -1.0)
    assert rows.tolist() == [[0, -1, -1], [1, 2, 3], [4, 5, -1]]
    assert valid.sum(1).tolist() == [1, 3, 2]


def test_maxsim_scores_match_the_inference_maxsim():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(3, 6, 8), dim=-1)
    query_mask = torch.ones(3, 6, dtype=torch.bool)
    query_mask[1, 4:] = False
    lengths = [5, 2, 7, 1]
    documents = [torch.nn.functional.normalize(torch.randn(n, 8), dim=-1) for n in lengths]
    padded = torch.nn.utils.rnn.pad_sequence(documents, batch_first=True)
    document_mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    ours = losses.maxsim_scores(queries, query_mask, padded, document_mask)
    reference = maxsim(queries * query_mask[..., None], documents)  # masked query tokens add 0
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_kl_distillation_matches_per_row_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    expected = 0.0
    for row in range(3):
        n = int(mask[row].sum())
        p = torch.softmax(teacher[row, :n], 0)
        q = torch.softmax(student[row, :n], 0)
        expected += float((p * (p / q).log()).sum())
    assert losses.kl_distillation(student, teacher, mask).item() == pytest.approx(expected, rel=1e-5)
    assert losses.kl_distillation(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_pointwise_and_listwise_reranker_losses():
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0, 0.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -sum(
        math.log(sigmoid(x)) if y else math.log(1 - sigmoid(x))
        for x, y in zip(logits.tolist(), labels.tolist())
    )
    assert losses.binary_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    rows = torch.tensor([[2.0, -1.0, 0.5], [1.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(-1) + math.exp(0.5)))
    expected -= math.log(math.exp(1) / (math.exp(1) + 1))
    assert losses.listwise_softmax(rows, mask).item() == pytest.approx(expected, rel=1e-5)


# -- optimizer and schedules ---------------------------------------------------------------------


def run_optimizer(optimizer_class, gradients, **settings):
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = optimizer_class([param], **settings)
    trace = []
    for grad in gradients:
        param.grad = grad.clone()
        optimizer.step()
        trace.append(param.detach().clone())
    return trace


def test_stable_adamw_is_adamw_while_updates_stay_in_bounds():
    gradients = [torch.tensor([0.5, -1.0, 2.0, 0.1])] * 5  # constant: g^2 / v_hat stays at 1
    settings = dict(lr=0.1, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    ours = run_optimizer(StableAdamW, gradients, **settings)
    reference = run_optimizer(torch.optim.AdamW, gradients, **settings)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stable_adamw_shrinks_the_step_after_a_gradient_spike():
    gradients = [torch.full((4,), 0.01)] * 10 + [torch.tensor([1.0, 0.01, 0.01, 0.01])]
    settings = dict(lr=0.1, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    ours = run_optimizer(StableAdamW, gradients, **settings)
    adamw = run_optimizer(torch.optim.AdamW, gradients, **settings)
    torch.testing.assert_close(ours[-2], adamw[-2])  # identical before the spike
    # The RMS of g^2 / v_hat at the spike, written out: v after 11 steps, bias-corrected.
    betas, step = (0.9, 0.98), 11
    v = np.zeros(4)
    for grad in gradients:
        v = betas[1] * v + (1 - betas[1]) * grad.numpy() ** 2
    v_hat = v / (1 - betas[1] ** step)
    rms = math.sqrt(np.mean(gradients[-1].numpy() ** 2 / v_hat))
    assert rms > 1
    ours_step, adamw_step = ours[-2] - ours[-1], adamw[-2] - adamw[-1]
    torch.testing.assert_close(ours_step, adamw_step / rms, rtol=1e-4, atol=1e-7)


def test_warmup_stable_decay_with_one_minus_sqrt():
    schedule = WarmupStableDecay(
        1.0, total_steps=100, warmup_steps=10, decay_steps=20, decay="1-sqrt", min_lr=0.1
    )
    assert [schedule(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(schedule(s) == 1.0 for s in range(10, 80))
    assert schedule(89) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(10 / 20)))
    assert schedule(99) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="exceed"):
        WarmupStableDecay(1.0, total_steps=10, warmup_steps=6, decay_steps=6)


def test_batch_size_warmup_grows_in_whole_sequences():
    warmup = BatchSizeWarmup(start_tokens=1024, final_tokens=8192, warmup_batches=10, multiple=512)
    sizes = [warmup(b) for b in range(12)]
    assert sizes[0] == 1024 and sizes[-1] == sizes[10] == 8192
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert all(s % 512 == 0 for s in sizes)
