"""The ranking distillation of sft.rank_distill, worked out by hand."""

import math

import pytest
import torch

from pagellm.train.rank_distill import ranking_kl as _ranking_kl
from pagellm.train.rank_distill import row_starts
from pagellm.train.sft import constrained_log_softmax


def ranking_kl(student_logits, teacher, row_of, blocked, positions):
    """The KL from raw student logits: the step hands it the constrained softmax it took."""
    return _ranking_kl(constrained_log_softmax(student_logits, blocked), teacher, row_of, blocked, positions)


def test_row_starts_find_each_rows_first_position_and_number_the_rows():
    starts, row_of = row_starts(torch.tensor([0, 0, 0, 2, 2, 5]))
    assert starts.tolist() == [0, 3, 5]
    assert row_of.tolist() == [0, 0, 0, 1, 1, 2]


def test_ranking_kl_by_hand():
    # One row, three items; two page positions: position 0 blocks nothing, position 1
    # blocks item 0 (placed). Teacher logits log([0.5, 0.3, 0.2]).
    teacher = torch.tensor([[0.5, 0.3, 0.2]]).log()
    student = torch.tensor([[0.2, 0.2, 0.6], [0.0, 0.5, 0.5]]).clamp(min=1e-9).log()
    blocked = torch.tensor([[1], [0]])  # (position 1, item 0)
    kl = ranking_kl(student, teacher, torch.tensor([0, 0]), blocked, torch.tensor([0, 1]))
    q1 = [0.3 / 0.5, 0.2 / 0.5]  # the teacher renormalised without item 0
    expected0 = sum(q * math.log(q / p) for q, p in zip([0.5, 0.3, 0.2], [0.2, 0.2, 0.6]))
    expected1 = sum(q * math.log(q / p) for q, p in zip(q1, [0.5, 0.5]))
    assert float(kl) == pytest.approx((expected0 + expected1) / 2, rel=1e-5)


def test_ranking_kl_is_zero_when_every_position_writes_the_teachers_ranking_and_only_positions_count():
    teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    blocked = torch.tensor([[1, 2, 2], [3, 3, 1]])  # position 1 blocks 3; position 2 blocks 3 and 1
    student = teacher.repeat(3, 1) + torch.tensor([[0.0], [5.0], [-2.0]])  # a shift per row changes nothing
    row_of = torch.tensor([0, 0, 0])
    assert float(ranking_kl(student, teacher, row_of, blocked, torch.tensor([0, 1, 2]))) == pytest.approx(0.0, abs=1e-6)
    off = student.clone()
    off[2] = torch.tensor([0.0, 0.0, 3.0, 0.0])
    assert float(ranking_kl(off, teacher, row_of, blocked, torch.tensor([2]))) > 0.1
    assert float(ranking_kl(off, teacher, row_of, blocked, torch.tensor([0, 1]))) == pytest.approx(0.0, abs=1e-6)


def test_ranking_kl_takes_no_gradient_through_the_teacher():
    teacher = torch.zeros(1, 3, requires_grad=True)
    student = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    ranking_kl(student, teacher, torch.tensor([0]), torch.zeros(2, 0, dtype=torch.long), torch.tensor([0])).backward()
    assert teacher.grad is None and student.grad is not None
