"""kernels.fused_ce against the float64 formula: loss, dx and dW over odd sizes and chunkings,
the megatron main_grad path, and (cuda) megatron's own output layer + fused CE at training size.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), so sizes stay small.
"""

import pytest
import torch

from kernels.fused_ce import cross_entropy_rows, fused_linear_cross_entropy, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _relerr(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _case(n, h, v, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(DEVICE)
    labels = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    return x, w, labels


def _ours_and_reference(x, w, labels, ref_labels=None, **kwargs):
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(x1, w1, labels, **kwargs)
    (loss * 0.5).backward()  # a scale that is not 1: the backward must apply it
    x2, w2 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = reference(x2, w2, labels if ref_labels is None else ref_labels)
    (ref * 0.5).backward()
    return (loss, x1.grad, w1.grad), (ref, x2.grad, w2.grad)


# fp32 inputs: the GEMMs and the softmax are fp32, so errors are fp32 roundoff over sums of
# h (GEMM) and V (softmax) terms: well under 1e-5 relative. bf16: z and dz are rounded to
# bf16 (u = 2^-8, the interpreter truncates: 2u) before the next GEMM, as megatron's path
# does; the loss itself is fp32 over bf16 logits, so it errs by about u * |z| / loss.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2 * 2.0**-8 * 4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,chunk", [(37, 16, 5000, 16), (8, 32, 300, 4096), (64, 8, 4096, 64)])
def test_matches_float64(n, h, v, chunk, dtype):
    """Odd token counts against the chunk size, vocabularies above, below and at one block."""
    x, w, labels = _case(n, h, v, dtype, seed=n + v)
    (loss, dx, dw), (ref, dx_ref, dw_ref) = _ours_and_reference(x, w, labels, chunk_tokens=chunk)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref.item()) <= loss_tol * ref.item()
    assert dx.dtype == dtype and dw.dtype == dtype
    assert _relerr(dx, dx_ref) <= grad_tol
    assert _relerr(dw, dw_ref) <= grad_tol


def test_wrong_labels_fail_the_same_check():
    """Negative control: labels shifted by one give a loss and gradients the check rejects."""
    x, w, labels = _case(16, 16, 300, torch.float32, seed=3)
    (loss, dx, _), (ref, dx_ref, _) = _ours_and_reference(x, w, (labels + 1) % 300, ref_labels=labels)
    assert abs(loss.item() - ref.item()) > 1e-3 * ref.item()
    assert _relerr(dx, dx_ref) > 0.1


def test_rows_kernel_overwrites_logits_with_the_gradient():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(5, 5000, generator=gen).to(DEVICE) * 4
    labels = torch.tensor([0, 4999, 4096, 4095, 17], device=DEVICE)  # block edges
    ref_z = z.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_z, labels, reduction="none")
    ref.sum().backward()
    loss = cross_entropy_rows(z, labels, scale=1.0)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), ref_z.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [4096, 5])  # one chunk: dW's GEMM in the backward; three
def test_main_grad_path_adds_into_the_fp32_buffer(chunk_tokens):
    """With fused_ce_main_grad (megatron's gradient_accumulation_fusion), dW goes into
    main_grad on top of what is there, scaled by the incoming gradient, and autograd gets a
    placeholder flagged as added."""
    x, w, labels = _case(12, 16, 300, torch.float32, seed=5)
    w1 = w.clone().requires_grad_()
    w1.fused_ce_main_grad = True
    w1.main_grad = torch.ones(w.shape, dtype=torch.float32, device=DEVICE)
    w1.grad_added_to_main_grad = False
    (fused_linear_cross_entropy(x, w1, labels, chunk_tokens=chunk_tokens) * 0.5).backward()
    w2 = w.double().requires_grad_()
    (reference(x.double(), w2, labels) * 0.5).backward()
    assert w1.grad_added_to_main_grad
    assert _relerr(w1.main_grad - 1.0, w2.grad) <= 1e-5
    assert _relerr(w1.main_grad - 1.0, 2 * w2.grad) > 0.4  # the scale matters: a missed one is caught


def test_bad_shapes_are_rejected():
    x, w, labels = _case(4, 8, 50, torch.float32, seed=6)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(x, w[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(x, w, labels[:3])


@pytest.mark.cuda
def test_matches_megatron_output_layer_and_native_fused_ce_at_training_size():
    """llama_1b3's output layer at mbs 2 (4096 tokens, h 2048, V 32000) in bf16 against
    megatron-core's native fused CE over the materialised logits (the stock path): both
    round z and dz to bf16 and compute the softmax in fp32, so the loss agrees to 1e-4
    relative and the gradients to a few bf16 roundings (4u normwise)."""
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", init_method="tcp://127.0.0.1:29533",
                                             rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
    x, w, labels = _case(4096, 2048, 32000, torch.bfloat16, seed=7)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(x1, w1, labels)
    loss.backward()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    logits = (x2 @ w2.t()).view(4096, 1, 32000)
    ref = fused_vocab_parallel_cross_entropy(logits, labels.view(4096, 1),
                                             parallel_state.get_tensor_model_parallel_group()).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-4 * ref.item()
    assert _relerr(x1.grad, x2.grad.double()) <= 4 * 2.0**-8
    assert _relerr(w1.grad, w2.grad.double()) <= 4 * 2.0**-8
    # DDP's buffer: one chunk of 4096, so dW's GEMM runs in the backward into main_grad, at
    # the 1/16 a schedule of 16 micro-batches scales the loss by (exact in bf16).
    w3 = w.clone().requires_grad_()
    w3.fused_ce_main_grad, w3.grad_added_to_main_grad = True, False
    w3.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=DEVICE)
    (fused_linear_cross_entropy(x, w3, labels) / 16).backward()
    assert _relerr(w3.main_grad * 16, w2.grad.double()) <= 4 * 2.0**-8
