"""Pure tensor math of upcycling (no Megatron): splitting, scaling, routing, noise, Drop-Upcycling,
options."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_dpsl.upcycle.errors import UpcycleError
from megatron_dpsl.upcycle.options import UpcycleOptions, parse_layer_freq
from megatron_dpsl.upcycle.transforms import (
    drop_upcycle_,
    init_router,
    split_fc1,
    split_fc2,
    upcycle_experts,
    weight_scales,
)

H, FF = 16, 32


def dense_mlp(gated, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * FF if gated else FF
    mlp = {
        "linear_fc1.weight": torch.randn(rows, H, generator=g),
        "linear_fc2.weight": torch.randn(H, FF, generator=g),
    }
    if bias:
        mlp["linear_fc1.bias"] = torch.randn(rows, generator=g)
        mlp["linear_fc2.bias"] = torch.randn(H, generator=g)
    return mlp


def ffn(x, fc1, fc2, gated, act, b1=None, b2=None):
    """Megatron's MLP: fc1 -> (GLU: act(x[:half]) * x[half:]) -> fc2."""
    h = x @ fc1.T + (b1 if b1 is not None else 0)
    if gated:
        a, b = torch.chunk(h, 2, dim=-1)
        h = act(a) * b
    else:
        h = act(h)
    return h @ fc2.T + (b2 if b2 is not None else 0)


def moe_forward(x, router, experts, topk, gated, act):
    """Megatron's default routing: top-k of the logits, softmax over the selected k."""
    logits = x @ router.T
    top, idx = torch.topk(logits, topk, dim=-1)
    probs = torch.softmax(top, dim=-1)
    out = torch.zeros(x.shape[0], H, dtype=x.dtype)
    for t in range(x.shape[0]):
        for p, e in zip(probs[t], idx[t]):
            ex = experts[int(e)]
            out[t] += p * ffn(x[t : t + 1], ex.fc1, ex.fc2, gated, act, ex.fc1_bias, ex.fc2_bias)[0]
    return out


@pytest.mark.parametrize("gated,act", [(True, F.silu), (False, F.gelu)])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_shards_sum_to_dense_ffn(gated, act, G):
    mlp = dense_mlp(gated)
    x = torch.randn(5, H, dtype=torch.float64)
    w1, w2 = mlp["linear_fc1.weight"].double(), mlp["linear_fc2.weight"].double()
    parts = sum(ffn(x, a, b, gated, act) for a, b in zip(split_fc1(w1, G, gated), split_fc2(w2, G)))
    # float64 sums of the same products in another order: rounding only
    torch.testing.assert_close(parts, ffn(x, w1, w2, gated, act), rtol=0, atol=1e-12)


@pytest.mark.parametrize("gated,act,bias", [(True, F.silu, False), (False, F.gelu, True)])
@pytest.mark.parametrize("G,E,k", [(1, 4, 2), (2, 8, 4), (4, 16, 8)])
def test_exact_scaling_preserves_the_dense_function(gated, act, bias, G, E, k):
    mlp = {n: t.double() for n, t in dense_mlp(gated, bias).items()}
    scales = weight_scales(
        "exact", num_experts=E, granularity=G, topk=k, gated=gated, activation="silu"
    )
    experts = upcycle_experts(mlp, num_experts=E, granularity=G, gated=gated, scales=scales)
    router = init_router(
        "virtual-group",
        num_experts=E,
        granularity=G,
        hidden_size=H,
        std=1.0,
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    x = torch.randn(7, H, dtype=torch.float64)
    dense = ffn(
        x,
        mlp["linear_fc1.weight"],
        mlp["linear_fc2.weight"],
        gated,
        act,
        mlp.get("linear_fc1.bias"),
        mlp.get("linear_fc2.bias"),
    )
    # float64: only summation-order rounding separates the two
    torch.testing.assert_close(
        moe_forward(x, router, experts, k, gated, act), dense, rtol=0, atol=1e-10
    )


def test_without_scaling_granular_moe_is_dense_over_G():
    """The reason for --weight-scaling: unscaled, a granular MoE outputs FFN(x)/G (He et al.
    2024)."""
    G, E, k = 4, 16, 8
    mlp = {n: t.double() for n, t in dense_mlp(True).items()}
    experts = upcycle_experts(
        mlp,
        num_experts=E,
        granularity=G,
        gated=True,
        scales=weight_scales(
            "none", num_experts=E, granularity=G, topk=k, gated=True, activation="silu"
        ),
    )
    router = init_router(
        "virtual-group",
        num_experts=E,
        granularity=G,
        hidden_size=H,
        std=1.0,
        generator=torch.Generator().manual_seed(2),
        dtype=torch.float64,
    )
    x = torch.randn(3, H, dtype=torch.float64)
    dense = ffn(x, mlp["linear_fc1.weight"], mlp["linear_fc2.weight"], True, F.silu)
    torch.testing.assert_close(
        moe_forward(x, router, experts, k, True, F.silu), dense / G, rtol=0, atol=1e-10
    )


def test_virtual_group_router_rows():
    r = init_router(
        "virtual-group",
        num_experts=12,
        granularity=3,
        hidden_size=H,
        std=0.02,
        generator=torch.Generator().manual_seed(0),
    )
    groups = r.view(4, 3, H)
    assert torch.equal(
        groups, groups[:, :1].expand_as(groups)
    )  # the G experts of a copy share a row
    assert torch.unique(r, dim=0).shape[0] == 4
    assert (
        init_router("zeros", num_experts=4, granularity=1, hidden_size=H, std=0.02, generator=None)
        .abs()
        .sum()
        == 0
    )


def test_expert_e_gets_shard_e_mod_G():
    mlp = dense_mlp(True)
    experts = upcycle_experts(
        mlp,
        num_experts=8,
        granularity=4,
        gated=True,
        scales=weight_scales(
            "none", num_experts=8, granularity=4, topk=4, gated=True, activation="silu"
        ),
    )
    shards = split_fc1(mlp["linear_fc1.weight"], 4, True)
    for e, ex in enumerate(experts):
        assert torch.equal(ex.fc1, shards[e % 4])


@pytest.mark.parametrize(
    "mode,gated,act,pre,expect",
    [
        ("he2024", True, "silu", False, 4 ** (1 / 3)),  # a = G = 4, GLU -> cube root
        ("he2024", False, "gelu", False, 2.0),  # a = G = 4, sqrt
        ("he2024", False, "squared_relu", False, 4 ** (1 / 3)),
        ("he2024", True, "silu", True, (16 * 4 / 8) ** (1 / 3)),  # pre-softmax: a = E*G/k
    ],
)
def test_he2024_factors(mode, gated, act, pre, expect):
    s = weight_scales(
        mode, num_experts=16, granularity=4, topk=8, gated=gated, activation=act, pre_softmax=pre
    )
    assert math.isclose(s.fc1, expect) and math.isclose(s.fc2, expect) and s.fc2_bias == 1.0


def test_exact_with_shared_expert_halves_both_paths():
    s = weight_scales(
        "exact",
        num_experts=8,
        granularity=2,
        topk=4,
        gated=True,
        activation="silu",
        shared_expert=True,
    )
    assert (s.fc1, s.fc2, s.fc2_bias, s.shared) == (1.0, 1.0, 0.5, 0.5)


def test_drop_upcycling_reinitialises_the_requested_units():
    g = torch.Generator().manual_seed(0)
    f = 400
    fc1, fc2 = (
        torch.randn(2 * f, H, generator=g) * 0.3 + 1.0,
        torch.randn(H, f, generator=g) * 0.5 - 2.0,
    )
    new1, new2 = fc1.clone(), fc2.clone()
    idx = drop_upcycle_(new1, new2, 0.25, True, torch.Generator().manual_seed(3))
    assert len(idx) == 100
    changed = (new2 != fc2).any(dim=0)
    assert changed.sum() == 100 and changed[idx].all()
    gate_changed = (new1[:f] != fc1[:f]).any(dim=1)
    up_changed = (new1[f:] != fc1[f:]).any(dim=1)
    assert torch.equal(gate_changed, changed) and torch.equal(up_changed, changed)
    # re-drawn from the slice's statistics: 100*16 samples, mean within ~5 standard errors
    assert abs(new2[:, idx].mean() - fc2.mean()) < 5 * fc2.std() / 40
    assert abs(new2[:, idx].std() / fc2.std() - 1) < 0.1


def test_noise_std_and_independent_experts():
    mlp = dense_mlp(True)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    experts = upcycle_experts(
        mlp,
        num_experts=4,
        granularity=1,
        gated=True,
        scales=weight_scales(
            "none", num_experts=4, granularity=1, topk=2, gated=True, activation="silu"
        ),
        noise_std=0.01,
        generators=gens,
    )
    deltas = [ex.fc1 - mlp["linear_fc1.weight"] for ex in experts]
    for d in deltas:  # 1024 samples: the std estimate is within ~10%
        assert abs(d.std().item() / 0.01 - 1) < 0.1
    assert not torch.equal(deltas[0], deltas[1])


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(num_experts=6, granularity=4), "--granularity"),
        (dict(num_experts=4, moe_router_topk=5), "--moe-router-topk"),
        (dict(num_experts=4, router_init="uniform"), "--router-init"),
        (dict(num_experts=4, weight_scaling="magic"), "--weight-scaling"),
        (dict(num_experts=4, drop_upcycling_ratio=1.0), "--drop-upcycling-ratio"),
        (dict(num_experts=4, activation="relu6"), "--activation"),
        (
            dict(num_experts=8, granularity=2, moe_router_topk=3, weight_scaling="exact"),
            "multiple of --granularity",
        ),
        (
            dict(
                num_experts=8,
                granularity=2,
                moe_router_topk=4,
                weight_scaling="exact",
                router_init="normal",
            ),
            "virtual-group",
        ),
        (dict(num_experts=4, weight_scaling="exact", moe_router_pre_softmax=True), "pre-softmax"),
        (dict(num_experts=4, weight_scaling="exact", expert_noise_std=0.01), "--expert-noise-std"),
        (dict(num_experts=4, moe_layer_freq="[1,2]"), "--moe-layer-freq"),
    ],
)
def test_option_errors_name_the_flag(kwargs, flag):
    with pytest.raises(
        UpcycleError, match=flag.replace("-", r"\-") if flag.startswith("--") else flag
    ):
        UpcycleOptions(**kwargs)


def test_layer_freq_spellings():
    assert parse_layer_freq("2") == 2
    assert parse_layer_freq("[1,0,1]") == [1, 0, 1]
    assert parse_layer_freq("1,0") == [1, 0]
    assert parse_layer_freq("([1]*2+[0])*2") == [1, 1, 0, 1, 1, 0]
    with pytest.raises(UpcycleError, match="--moe-layer-freq"):
        UpcycleOptions(num_experts=4, moe_layer_freq="__import__('os')")
    assert UpcycleOptions(num_experts=4, moe_layer_freq=2).moe_layers(5) == [
        True,
        False,
        True,
        False,
        True,
    ]
