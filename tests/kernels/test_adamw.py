"""kernels.adamw against the float64 formula over tensors of odd sizes (one launch for all),
the table's reuse check, and (cuda) torch's fused AdamW at llama_1b3's largest weight.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py).
"""

import pytest
import torch

from kernels.adamw import DEFAULT_BLOCK, TensorTable, reference, step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _tensors(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda scale: [(torch.randn(s, generator=gen) * scale).to(DEVICE) for s in shapes]  # noqa: E731
    p, g, m = make(1.0), make(1.0), make(0.1)
    v = [t.abs() * 0.01 for t in make(1.0)]
    w = [torch.zeros(s, dtype=torch.bfloat16, device=DEVICE) for s in shapes]
    return p, g, m, v, w


@pytest.mark.parametrize("block, whole_blocks", [(16, True), (16, False), (DEFAULT_BLOCK, True)])
def test_matches_float64_over_odd_sizes_in_one_launch(block, whole_blocks):
    """Whole blocks (the unmasked path) and partial ones (masked) in the same launch."""
    shapes = [(7, 5), (block + 1,), (3,), (2 * block,), (3 * block - 16,)]  # block edges on both sides
    p, g, m, v, w = _tensors(shapes, seed=0)
    expected = [reference(*t, step_count=3, scale=0.5, **HYPER) for t in zip(p, g, m, v)]
    table = TensorTable(p, g, m, v, w, block=block, whole_blocks=whole_blocks)
    assert table.num_blocks == sum(-(-t.numel() // block) for t in p)  # ceil per tensor
    step(table, step_count=3, scale=torch.tensor(0.5, device=DEVICE), **HYPER)
    for i, (p_ref, m_ref, v_ref) in enumerate(expected):
        # fp32 arithmetic against float64: a few fp32 ulps.
        torch.testing.assert_close(p[i].double(), p_ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m[i].double(), m_ref, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(v[i].double(), v_ref, rtol=1e-6, atol=1e-10)
        # The bf16 copy: p rounded (to nearest on a GPU; the CPU interpreter truncates, 1 ulp).
        assert ((w[i].double() - p[i].double()).abs() <= p[i].double().abs() * 2.0**-7).all()


def test_a_missing_scale_fails_the_same_check():
    """Negative control: the clip scale enters the result (scale 1 is told from 0.5)."""
    p, g, m, v, w = _tensors([(300,)], seed=1)
    p_ref, _, _ = reference(p[0], g[0], m[0], v[0], step_count=1, scale=0.5, **HYPER)
    step(TensorTable(p, g, m, v, w), step_count=1, scale=torch.tensor(1.0, device=DEVICE), **HYPER)
    assert not torch.allclose(p[0].double(), p_ref, rtol=1e-4)


def test_table_knows_when_tensors_moved_and_rejects_bad_tensors():
    p, g, m, v, w = _tensors([(10,), (20,)], seed=2)
    table = TensorTable(p, g, m, v, w)
    assert table.matches(p, g, m, v, w)
    assert not table.matches(p, [t.clone() for t in g], m, v, w)
    with pytest.raises(ValueError, match="fp32"):
        TensorTable([t.double() for t in p], g, m, v, w)
    with pytest.raises(ValueError, match="sizes differ"):
        TensorTable(p, g[::-1], m, v, w)
    with pytest.raises(ValueError, match="power of two"):
        TensorTable(p, g, m, v, w, block=3000)


@pytest.mark.cuda
def test_matches_torch_fused_adamw_at_training_size():
    """llama_1b3's embedding-sized weight (32000 x 2048) and a norm weight, 3 steps, against
    torch's fused AdamW (the stock path's kernel): same formula, fp32, a few ulps apart."""
    p, g, m, v, w = _tensors([(32000, 2048), (2048,)], seed=3)
    ref = [torch.nn.Parameter(t.clone()) for t in p]
    opt = torch.optim.AdamW(ref, fused=True, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    table = TensorTable(p, g, m, v, w)
    for count in (1, 2, 3):
        for r, grad in zip(ref, g):
            r.grad = grad.clone()
        opt.step()
        step(table, step_count=count, scale=torch.ones((), device="cuda"), **HYPER)
    for ours, theirs, weight in zip(p, ref, w):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(weight, ours.to(torch.bfloat16))
