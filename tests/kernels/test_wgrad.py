"""kernels.wgrad: weight-gradient GEMMs accumulating into fp32 gradient buffers."""

import pytest
import torch

from kernels import wgrad


def test_16_bit_buffer_accumulates_the_weight_gradient():
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(32, n, generator=gen).to(torch.bfloat16) for n in (6, 4))
    main = torch.randn(4, 6, generator=gen).to(torch.bfloat16)
    expected = main.double() + dy.double().t() @ x.double()
    wgrad.wgrad_gemm_accum_fp16(x, dy, main)
    assert main.dtype == torch.bfloat16  # accumulated in place, in the 16-bit buffer
    # One rounding of the sum to bf16 (unit roundoff 2^-9 relative) plus the product's
    # own: within 2^-7 of the largest entry. Without the `main +` it is off by ~1.
    assert (main.double() - expected).abs().max() <= 2.0**-7 * expected.abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_without_cuda_megatron_keeps_its_unfused_path():
    from megatron.core.tensor_parallel import layers

    before = layers._grad_accum_fusion_available
    assert wgrad.install() is before
    assert layers._grad_accum_fusion_available is before


@pytest.mark.cuda
@pytest.mark.parametrize("tokens,out_features,in_features", [(2048, 6144, 2048), (4096, 2048, 5632), (100, 48, 80)])
def test_fp32_accumulation_matches_the_reference_on_gpu(tokens, out_features, in_features):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, in_features, device="cuda", generator=gen).to(torch.bfloat16)
    dy = torch.randn(tokens, out_features, device="cuda", generator=gen).to(torch.bfloat16)
    main = torch.randn(out_features, in_features, device="cuda", generator=gen)
    expected = main + dy.double().t().matmul(x.double()).float()
    for _ in range(2):  # accumulates: a second call adds the same gradient again
        wgrad.wgrad_gemm_accum_fp32(x, dy, main)
    expected = expected + dy.double().t().matmul(x.double()).float()
    assert torch.allclose(main, expected, rtol=1e-3, atol=1e-2 * tokens ** 0.5)
    assert wgrad.install()
