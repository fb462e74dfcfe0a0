"""The fused Triton path (megatron_dpsl/losses/dpsl_triton.py) equals the torch path: values and
gradients.

CPU-only machines run the kernels under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before Triton is imported; the interpreter's launch shape is 32-element blocks
and 3 spans per expert row,
so these small batches exercise the loops, the span prefixes and partial blocks). With a GPU the
same tests run the compiled kernels on CUDA tensors.

Tolerances: both paths evaluate the same float32 table with the same formulas; only the op order and
the log/exp implementations (NumPy or CUDA vs torch) differ, by a few float32 ulps per CDF value:
<= 1e-6 relative on per-expert losses, <= 1e-6 x the largest entry on gradients.
"""

import os

import pytest
import torch

from megatron_dpsl import dpsl_loss, dpsl_loss_per_expert
from megatron_dpsl.losses import dpsl_triton
from megatron_dpsl.losses.dpsl import IMPL_ENV

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not dpsl_triton.runs_on(DEVICE),
    reason="Triton not installed (pip install triton)"
    if dpsl_triton.triton is None
    else "Triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it on "
    "CPU-only machines)",
)


def _probs(num_tokens, num_experts, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(num_tokens, num_experts, generator=g) * scale, -1)


def _both(probs, alpha, group_ids=None, padding_mask=None, dtype=torch.float32, per_expert=True):
    """(fused, torch) x (loss, grad) for the same input, on DEVICE."""
    out = []
    for impl in ("triton", "torch"):
        p = probs.to(device=DEVICE, dtype=dtype).requires_grad_()
        ids = group_ids.to(DEVICE) if group_ids is not None else None
        pad = padding_mask.to(DEVICE) if padding_mask is not None else None
        fn = dpsl_loss_per_expert if per_expert else dpsl_loss
        loss = fn(p, alpha, ids, pad, impl=impl)
        (grad,) = torch.autograd.grad(loss.sum(), p)
        out.append((loss.detach().cpu(), grad.cpu()))
    return out


def _assert_same(fused, ref):
    (lf, gf), (lr, gr) = fused, ref
    assert lf.dtype == lr.dtype == torch.float32 and gf.dtype == gr.dtype
    torch.testing.assert_close(
        lf, lr, rtol=1e-6, atol=1e-7
    )  # a few float32 ulps per CDF value (docstring)
    # bf16 gradients: float32 values an ulp apart may round to neighbouring bf16 values (2^-7
    # relative)
    rtol = 2.0**-7 if gf.dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(
        gf.float(), gr.float(), rtol=rtol, atol=1e-6 * gr.float().abs().max().item()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_expert", [True, False])
def test_dense_matches_torch(dtype, per_expert):
    # 301 tokens: not a multiple of the block; alpha < 1 and a large A put points in both tails
    alpha = torch.tensor([0.3, 1.0, 2.0, 0.05], dtype=torch.float64)
    fused, ref = _both(_probs(301, 4, seed=1, scale=6.0), alpha, dtype=dtype, per_expert=per_expert)
    assert fused[1].dtype == dtype
    _assert_same(fused, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_padding_empty_group_match_torch(dtype):
    probs = _probs(161, 4, seed=2)  # 3 spans of 64, 64, 33 tokens under the interpreter
    alpha = torch.tensor(
        [[1.5, 1.5, 0.5, 0.5], [0.5, 0.5, 1.5, 1.5], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64
    )
    g = torch.Generator().manual_seed(3)
    gids = torch.randint(0, 2, (161,), generator=g)  # group 2 empty
    pad = torch.rand(161, generator=g) < 0.25
    probs_nan = probs.masked_fill(
        pad[:, None], float("nan")
    )  # padded rows are never read into the loss
    for ids, mask in ((gids, None), (gids, pad), (None, pad)):
        a = alpha if ids is not None else alpha[0]
        fused, ref = _both(probs if mask is None else probs_nan, a, ids, mask, dtype=dtype)
        _assert_same(fused, ref)
        if mask is not None:
            assert (fused[1][mask] == 0).all()


def test_ties_match_torch():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(
        torch.randint(0, 3, (120, 4), generator=g).float(), -1
    )  # each column: 3 values
    gids = torch.arange(120) % 2
    fused, ref = _both(probs, [1.0] * 4)
    _assert_same(fused, ref)  # ties ranked in token order in both paths: the same gradient entries
    _assert_same(*_both(probs, torch.ones(2, 4), gids))


def test_no_grad_and_all_padding():
    probs = _probs(90, 3, seed=5).to(DEVICE)
    with torch.no_grad():
        out = dpsl_loss_per_expert(probs, [1.0] * 3, impl="triton")
    torch.testing.assert_close(
        out, dpsl_loss_per_expert(probs, [1.0] * 3, impl="torch"), rtol=1e-6, atol=1e-7
    )
    pad = torch.ones(90, dtype=torch.bool, device=DEVICE)
    p = probs.clone().requires_grad_()
    loss = dpsl_loss(p, [1.0] * 3, padding_mask=pad, impl="triton")
    loss.backward()
    assert loss.item() == 0 and (p.grad == 0).all()


def test_invalid_inputs():
    probs = _probs(64, 4, seed=6).to(DEVICE)
    probs[10, 2] = float("nan")
    assert torch.isnan(dpsl_loss(probs, [1.0] * 4, impl="triton"))
    gids = torch.arange(64, device=DEVICE) % 2
    assert torch.isnan(dpsl_loss_per_expert(probs, torch.ones(2, 4), gids, impl="triton")[2])
    if (
        DEVICE.type == "cpu"
    ):  # on a GPU a device-side assert, which would end this process's CUDA context
        with pytest.raises(RuntimeError, match="group_ids out of range"):
            dpsl_loss(probs, torch.ones(2, 4), torch.full((64,), 2), impl="triton")


def test_impl_selection(monkeypatch):
    probs = _probs(40, 4, seed=7).to(DEVICE)
    with pytest.raises(ValueError, match="impl"):
        dpsl_loss(probs, [1.0] * 4, impl="fast")
    with pytest.raises(ValueError, match="float64"):
        dpsl_loss(probs.double(), [1.0] * 4, impl="triton")
    monkeypatch.setenv(IMPL_ENV, "torch")
    via_env = dpsl_loss(probs, [1.0] * 4)
    assert torch.equal(via_env, dpsl_loss(probs, [1.0] * 4, impl="torch"))
    monkeypatch.setenv(IMPL_ENV, "bogus")
    with pytest.raises(ValueError, match=IMPL_ENV):
        dpsl_loss(probs, [1.0] * 4)
    monkeypatch.delenv(IMPL_ENV)
    # auto: the fused kernels for CUDA tensors, the torch path on the CPU (the interpreter is for
    # tests)
    auto = dpsl_loss(probs, [1.0] * 4)
    assert torch.equal(
        auto, dpsl_loss(probs, [1.0] * 4, impl="triton" if DEVICE.type == "cuda" else "torch")
    )


_OFFLINE_COMPILE = r"""
import json, os, subprocess, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_dpsl.losses import dpsl_triton as fl

target, out = GPUTarget("cuda", 90, 32), {}
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ptr = lambda t: "*" + t
for vals, groups in (("bf16", False), ("fp32", False), ("bf16", True)):
    sig = dict(vals_ptr=ptr(vals), idx_ptr="*i64", group_ptr="*i32", counts_ptr="*i32", consts_ptr="*fp32",
               coefs_ptr="*fp32", grad_ptr="*fp32", partial_ptr="*fp32", ok_ptr="*i32", T="i32", E="i32", S="i32",
               span="i32", num_groups="i32", tiny="fp32")
    const = dict(HAS_GROUPS=groups, NEED_GRAD=True, BLOCK=512 if groups else 1024, G1P=4 if groups else 1, SP=32, NC=16)
    sig.update({k: "constexpr" for k in const})
    kernel = triton.compile(ASTSource(fl._eval_kernel, sig, const), target=target, options=dict(num_warps=8))
    usage = ""
    if os.path.exists(cuobjdump):
        with open("k.cubin", "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", "k.cubin"], capture_output=True, text=True).stdout
    out[f"eval {vals} groups={groups}"] = usage
sig = dict(idx_ptr="*i64", gid_ptr="*i64", pad_ptr="*i1", group_ptr="*i32", counts_ptr="*i32", T="i32", S="i32",
           span="i32", num_groups="i32")
const = dict(HAS_GID=True, HAS_PAD=True, BLOCK=512, G1P=4)
sig.update({k: "constexpr" for k in const})
triton.compile(ASTSource(fl._count_kernel, sig, const), target=target, options=dict(num_warps=8))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The compiled (not interpreted) kernels build for an H100 (sm_90) here, without a GPU:
    Triton's own compiler and ptxas, in a process without TRITON_INTERPRET. No local memory = no
    register spills."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    run = subprocess.run(
        [sys.executable, "-c", _OFFLINE_COMPILE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    for name, text in usage.items():
        if (
            text
        ):  # cuobjdump ships with Triton's NVIDIA backend; without it only the build is checked
            assert "LOCAL:0" in text and "STACK:0" in text, f"{name} spills registers:\n{text}"
