"""core.choices: the Literal types and their tuples, and the head dims the sweeper and the
Triton attention kernel agree on (the kernel's own input check, on CPU tensors)."""

import typing

import pytest

from core import choices
from core.config import Layout, ModelConfig
from sweeper.validity import invalid_reason

CANDIDATE_HEAD_DIMS = range(4, 520, 4)


def _accepted_by_the_kernel(head_dims) -> set[int]:
    torch = pytest.importorskip("torch")
    from kernels.attention import _check_inputs

    accepted = set()
    for d in head_dims:
        q = k = v = torch.empty(1, 1, 1, d)  # shape and dtype are all the check reads
        try:
            _check_inputs(q, k, v)
        except ValueError as exc:
            assert "head dim" in str(exc), exc  # rejected for its head dim, nothing else
            continue
        accepted.add(d)
    return accepted


def _accepted_by_the_sweeper(head_dims) -> set[int]:
    layout = Layout(attention="triton", gbs=2)
    return {d for d in head_dims
            if invalid_reason(ModelConfig(hidden_size=2 * d, num_attention_heads=2, num_query_groups=1),
                              layout, 2) is None}


def test_the_kernel_accepts_exactly_the_head_dims_the_sweeper_allows():
    assert _accepted_by_the_kernel(CANDIDATE_HEAD_DIMS) == set(choices.TRITON_HEAD_DIMS)
    assert _accepted_by_the_sweeper(CANDIDATE_HEAD_DIMS) == set(choices.TRITON_HEAD_DIMS)


def test_head_dim_check_negative_control(monkeypatch):
    # A copy that drifts from the kernel's list is caught: the kernel reads core.choices itself.
    import kernels.attention as attention

    monkeypatch.setattr(attention, "HEAD_DIMS", (16, 32, 64))
    assert _accepted_by_the_kernel(CANDIDATE_HEAD_DIMS) != set(choices.TRITON_HEAD_DIMS)


def test_tuples_are_the_literals_values_and_defaults_come_first():
    assert choices.ATTENTION_KERNELS == typing.get_args(choices.AttentionKernel)
    assert choices.NORM_KERNELS == typing.get_args(choices.NormKernel)
    assert set(choices.FUSION_CHOICES) == set(choices.FUSION_TAGS) == set(choices.FUSION_TYPES)
    defaults = Layout()
    for axis, values in choices.FUSION_CHOICES.items():
        assert getattr(defaults, axis) == values[0] == choices.FUSION_DEFAULTS[axis]
        assert typing.get_type_hints(Layout)[axis] is choices.FUSION_TYPES[axis]
