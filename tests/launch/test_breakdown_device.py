"""The device (CUDA) side of the step breakdown on synthetic profiler events: kernel names,
how a kernel finds its launcher, the top_kernels list, and totals that add up to the step."""

import ast
from pathlib import Path

import pytest

from launch.breakdown import CATEGORIES, Event, breakdown, short_name
from launch.categories import TRITON_ATTENTION_KERNELS, TRITON_NORM_KERNELS, kernel_category, name_category

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
FUSED_ADAM = ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous "
              "namespace)::FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::"
              "FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)0, false>, float*, double>("
              "at::native::(anonymous namespace)::FusedOptimizerTensorListMetadata<4>, float*, double)")
ADD = ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
       "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)")
COPY = "void at::native::elementwise_kernel<128, 4, at::native::direct_copy_kernel_cuda>(int)"
SDPA_FWD = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0"
NVJET = "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT"
ALLREDUCE = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"


@pytest.mark.parametrize("name, expected", [
    # GEMMs: cuBLAS (nvjet, xmma, ampere), CUTLASS, inductor templates
    (NVJET, "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x10_nn_align8>("
     "cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x10_nn_align8::Params)", "matmul"),
    ("triton_tem_fused_addmm_0", "matmul"),
    # attention: cuDNN SDPA, flash, memory-efficient (a CUTLASS kernel), megatron's softmax, ours
    (SDPA_FWD, "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7_64x128x128_4x2x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4> >(Flash_fwd_params)",
     "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel::Params)",
     "attention"),
    ("void scaled_upper_triang_masked_softmax_warp_forward<c10::BFloat16, c10::BFloat16, float, 11>()",
     "attention"),
    ("_fwd_kernel", "attention"),
    ("_dkdv_kernel", "attention"),
    ("_dq_kernel", "attention"),
    ("_delta_kernel", "attention"),
    ("_fwd_kernel_0d1d2d3d4d5d6de7de", "attention"),  # older Triton appends the signature
    # norms: our Triton RMSNorm, torch's layer/rms norm, apex, an inductor-compiled RMSNorm
    ("_forward_kernel", "norm"),
    ("_backward_kernel", "norm"),
    ("_dw_reduce_kernel", "norm"),
    ("_backward_chunked_kernel", "norm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float)",
     "norm"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel<c10::BFloat16, float>()", "norm"),
    ("void cuApplyRMSNorm<c10::BFloat16, float, c10::BFloat16>()", "norm"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm"),
    ("_add_norm_bwd_kernel", "norm"),  # kernels/add_rmsnorm.py: the residual add rides on the norm
    # the optimizer: torch's fused Adam, the gradient norm
    (FUSED_ADAM, "optimizer"),
    ("aten::_fused_adam_", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<1>, at::native::(anonymous namespace)::LpNormFunctor<float, (at::native::"
     "NormType)1, float, float>, float*, int>()", "optimizer"),  # _foreach_norm: gradient clipping
    # no family: these are elementwise when their launcher says nothing more
    (ADD, None),
    ("triton_poi_fused_add_mul_silu_0", None),
    ("triton_red_fused__log_softmax_nll_loss_forward_0", None),
    ("_rope_kernel", None),
    ("_fwd_kernel_tail", None),  # only the exact Triton names are ours
    ("Memcpy DtoD (Device -> Device)", None),
])
def test_kernel_names(name, expected):
    assert name_category(name) == expected


def _triton_launches(*paths: Path) -> set[str]:
    """Names of the @triton.jit functions these files define and launch (`kernel[grid](...)`,
    or wrapped in kernels.fast_launch's `CachedLaunch(kernel)`), the kernels and their
    launcher possibly in different files."""
    trees = [ast.parse(path.read_text()) for path in paths]
    jitted = {f.name for tree in trees for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
              and any("jit" in ast.unparse(d) for d in f.decorator_list)}
    calls = [n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.Call)]
    launched = {n.func.value.id for n in calls
                if isinstance(n.func, ast.Subscript) and isinstance(n.func.value, ast.Name)}
    cached = {a.id for n in calls if isinstance(n.func, ast.Name) and n.func.id == "CachedLaunch"
              for a in n.args if isinstance(a, ast.Name)}
    return jitted & (launched | cached)


def test_our_triton_kernel_names_are_known():
    attention = set().union(*(_triton_launches(KERNELS / f"attention_{part}.py")
                              for part in ("fwd", "bwd", "dq", "dq_ds", "gluon_fwd", "gluon_bwd")))
    norm = (_triton_launches(KERNELS / "rmsnorm.py", KERNELS / "rmsnorm_kernels.py",
                             KERNELS / "rmsnorm_two_pass.py")
            | _triton_launches(KERNELS / "add_rmsnorm.py"))
    assert attention == set(TRITON_ATTENTION_KERNELS)
    assert norm == set(TRITON_NORM_KERNELS)
    ours = ("attention_fwd.py", "attention_bwd.py", "attention_dq.py", "attention_dq_ds.py",
            "attention_gluon_fwd.py", "attention_gluon_bwd.py", "rmsnorm.py", "rmsnorm_kernels.py",
            "rmsnorm_two_pass.py", "add_rmsnorm.py")
    for path in KERNELS.glob("*.py"):  # no other kernel of ours may take one of these names
        if path.name not in ours:
            assert not _triton_launches(path) & (attention | norm), path.name


@pytest.mark.parametrize("name, launcher, expected", [
    (NVJET, "elementwise", "matmul"),  # a GEMM under a generic op
    (SDPA_FWD, None, "attention"),  # no launcher found
    ("_forward_kernel", "other", "norm"),  # launched from Python outside any op
    (NVJET, "attention", "attention"),  # a scope beats the name (unfused attention's bmm)
    (ADD, "optimizer", "optimizer"),
    (ADD, None, "elementwise"),
    (ADD, "dp_comm", "dp_comm"),  # grad scaling inside the dp_comm scope
    (ALLREDUCE, "dp_comm", "dp_comm"),
    (ALLREDUCE, "elementwise", "tp_comm"),
    ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", None, "pp_comm"),
    (ALLREDUCE, "idle", "idle"),  # a barrier
])
def test_kernel_category(name, launcher, expected):
    assert kernel_category(name, launcher) == expected


def test_short_names():
    assert short_name(ADD) == "vectorized_elementwise_kernel<4, CUDAFunctor_add<...>, array<...> >"
    assert short_name(FUSED_ADAM).startswith(
        "multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<...>, FusedAdamMathFunctor<...>")
    assert short_name(ALLREDUCE) == "ncclDevKernel_AllReduce_Sum_f32_RING_LL"
    assert short_name("Memcpy HtoD (Pageable -> Device)") == "Memcpy HtoD (Pageable -> Device)"
    assert short_name(SDPA_FWD) == SDPA_FWD
    assert len(short_name("k" * 300)) == 96


def _step_events() -> list[Event]:
    """One step as an older torch reports it: no kernel carries a link; each has the id of
    its runtime call, and runtime ids overlap the ops' own ids. Most kernels have names
    of no family (COPY), so only their launcher can tell their category."""
    return [
        Event(name="train_step", start=0, end=100, thread=1, id=1),
        Event(name="model", start=1, end=40, thread=1, parent=0, id=2),
        Event(name="norm", start=2, end=5, thread=1, parent=1, id=3),
        Event(name="RMSNormFunction", start=2, end=5, thread=1, parent=2, seq=9, id=4),
        Event(name="cuLaunchKernelEx", start=3, end=4, thread=1, parent=3, id=7, runtime=True),
        Event(name="attention", start=6, end=9, thread=1, parent=1, id=5),
        Event(name="aten::_scaled_dot_product_cudnn_attention", start=6, end=9, thread=1, parent=5, id=6),
        Event(name="cudaLaunchKernel", start=7, end=8, thread=1, parent=6, id=8, runtime=True),
        Event(name="aten::mm", start=10, end=12, thread=1, parent=1, id=7),  # id 7, as a runtime call
        Event(name="cudaLaunchKernel", start=10.5, end=11, thread=1, parent=8, id=9, runtime=True),
        Event(name="aten::add", start=13, end=14, thread=1, parent=1, id=10),
        Event(name="cudaLaunchKernel", start=13.2, end=13.5, thread=1, parent=10, id=11, runtime=True),
        Event(name="cudaLaunchKernel", start=13.6, end=13.9, thread=1, parent=10, id=12, runtime=True),
        # backward on the autograd thread: the norm's backward node inherits the forward's scope
        Event(name="autograd::engine::evaluate_function: FunctionBackward", start=50, end=55,
              thread=2, seq=9, id=13),
        Event(name="cuLaunchKernelEx", start=51, end=52, thread=2, parent=13, id=14, runtime=True),
        # the optimizer: its launch was nested under nothing (the OS thread id of a runtime call)
        Event(name="optimizer", start=70, end=90, thread=1, parent=0, id=15),
        Event(name="aten::_foreach_add_", start=71, end=89, thread=1, parent=15, id=16),
        Event(name="cudaLaunchKernel", start=72, end=73, thread=4242, id=15, runtime=True),
        # the device: kernels carry their runtime call's id
        Event(name=COPY, start=20, end=25, device=True, id=7),
        Event(name=COPY, start=25, end=35, device=True, id=8),
        Event(name=COPY, start=35, end=45, device=True, id=9),
        Event(name=ADD, start=45, end=46, device=True, id=11),
        Event(name=ADD.replace("3ul", "2ul"), start=46, end=47, device=True, id=12),  # same short name
        Event(name=COPY, start=56, end=60, device=True, id=14),
        Event(name=COPY, start=75, end=85, device=True, id=15),
        Event(name="optimizer", start=70, end=90, device=True),  # kineto's mirror of the scope
    ]


def test_kernels_find_their_launcher_without_links():
    b = breakdown(_step_events())
    ms = {k: round(v * 1e6, 6) for k, v in b["categories"].items()}
    assert b["device"] == "cuda"
    assert ms["norm"] == 5 + 4  # the forward kernel (scope) and the backward one (its forward's scope)
    assert ms["attention"] == 10
    assert ms["matmul"] == 10  # aten::mm launched it; the runtime call sharing its id did not
    assert ms["elementwise"] == 2
    assert ms["optimizer"] == 10  # the launch found by time inside the optimizer scope
    assert ms["idle"] == 100 - 41
    assert sum(b["categories"].values()) == pytest.approx(b["step_s"], rel=1e-12)


def _linked_step() -> list[Event]:
    """A step as a newer torch reports it: each kernel links to the op that launched it."""
    return [
        Event(name="train_step", start=0, end=10, thread=1, id=1),
        Event(name="aten::copy_", start=1, end=2, thread=1, parent=0, id=2),
        Event(name="optimizer", start=3, end=6, thread=1, parent=0, id=3),
        Event(name="aten::_foreach_mul_", start=3, end=6, thread=1, parent=2, id=4),
        Event(name="cudaLaunchKernel", start=4, end=5, thread=1, parent=3, id=1, link=4, runtime=True),
        Event(name=ADD, start=2, end=4, device=True, id=99, link=2),  # elementwise launcher
        Event(name=SDPA_FWD, start=4, end=5, device=True, id=98, link=2),  # elementwise: the name decides
        Event(name=ADD, start=6, end=9, device=True, id=1, link=4),  # inside the optimizer scope
    ]


def test_a_linked_op_is_the_launcher():
    ms = {k: round(v * 1e6, 6) for k, v in breakdown(_linked_step())["categories"].items()}
    assert (ms["elementwise"], ms["attention"], ms["optimizer"], ms["idle"]) == (2, 1, 3, 4)


def test_top_kernels():
    b = breakdown(_step_events())
    top = b["top_kernels"]
    assert [(k["name"], k["category"], k["count"]) for k in top[:4]] == [
        ("elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "attention", 1),
        ("elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "matmul", 1),
        ("elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "optimizer", 1),
        ("elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "norm", 2),  # forward and backward
    ]
    assert [k["total_s"] for k in top] == pytest.approx([10e-6, 10e-6, 10e-6, 9e-6, 2e-6])
    add = top[-1]
    assert (add["name"], add["category"], add["count"]) == (short_name(ADD), "elementwise", 2)
    assert add["share"] == pytest.approx(0.02)


def test_top_kernels_clip_to_the_step_and_split_by_category():
    began_before = Event(name=ADD, start=-5, end=0.5, device=True, link=2)
    tiny = [Event(name=f"kernel_{k}", start=9 + k / 100, end=9 + (k + 1) / 100, device=True) for k in range(30)]
    b = breakdown(_linked_step() + [began_before] + tiny)
    top = b["top_kernels"]
    assert len(top) == 25
    assert [(k["category"], k["count"], k["total_s"]) for k in top[:3]] == [
        ("optimizer", 1, pytest.approx(3e-6)), ("elementwise", 2, pytest.approx(2.5e-6)),
        ("attention", 1, pytest.approx(1e-6))]
    assert sum(b["categories"].values()) == pytest.approx(b["step_s"], rel=1e-12)


def test_cpu_breakdown_has_no_top_kernels():
    events = [Event(name="train_step", start=0, end=10, thread=1),
              Event(name="aten::mm", start=1, end=5, thread=1, parent=0)]
    b = breakdown(events)
    assert b["device"] == "cpu" and "top_kernels" not in b
    assert b["categories"]["matmul"] == pytest.approx(4e-6)
