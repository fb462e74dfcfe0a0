"""DPSL overhead: MoELayer forward+backward with DPSLRouter vs TopKRouter, same layer, same run.

    python benchmarks/router_overhead.py            # CPU table (tokens × experts grid)
    python benchmarks/router_overhead.py --quick    # smoke run
    python benchmarks/router_overhead.py --device cuda   # on a GPU machine (TE optional)

Both layers are Megatron ``MoELayer`` s (allgather dispatcher, SequentialMLP experts, one process)
built from the same local spec; only ``MoESubmodules.router`` differs. Baseline: TopKRouter with
the stock ``aux_loss``; DPSL: DPSLRouter with ``["aux_loss", "dpsl"]`` (so the ratio is the cost
DPSL adds on top of a standard setup). Prints median times and the ratio DPSL / baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(router_cls, num_experts, hidden, ffn, dpsl, device):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dpsl.config.transformer_config import DPSLTransformerConfig
    from megatron_dpsl.models.specs import with_router

    cfg = DPSLTransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=4,
        num_moe_experts=num_experts,
        moe_router_topk=2,
        add_bias_linear=False,
        use_cpu_initialization=True,
        moe_router_load_balancing_type=["aux_loss", "dpsl"] if dpsl else "aux_loss",
        moe_aux_loss_coeff=[1e-2, 0.0] if dpsl else 1e-2,
        moe_dpsl_coeff=0.01,
        moe_dpsl_log_interval=0,
    )
    spec = with_router(get_gpt_layer_local_spec(num_experts=num_experts).submodules.mlp, router_cls)
    torch.manual_seed(0)
    layer = build_module(spec, config=cfg).to(device)
    layer.set_layer_number(1)
    return layer


def _step(layer, x):
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, _ = layer(x)
    out.float().pow(2).mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class _RouterOnly(torch.nn.Module):
    """The router as a layer: returns (probs, None) so _step can time it like the MoE layer."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, x):
        probs, _ = self.router(x)
        return probs, None


def time_pair(base, dpsl, x, iters, warmup):
    """Median fwd+bwd seconds of both layers, interleaved so machine load hits both alike."""
    tb, td = [], []
    for i in range(warmup + iters):
        b, d = _step(base, x), _step(dpsl, x)
        if i >= warmup:
            tb.append(b)
            td.append(d)
    return statistics.median(tb), statistics.median(td)


def main():
    parser = argparse.ArgumentParser(description="DPSL overhead vs TopKRouter in one MoELayer")
    parser.add_argument("--quick", action="store_true", help="one small shape, few iterations")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    from support.megatron_cpu import init_single_process  # CPU shims for Megatron's CUDA-only calls

    init_single_process()
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_dpsl.routing.router import DPSLRouter

    grid = [(1024, 8)] if args.quick else [(1024, 8), (4096, 8), (4096, 64), (8192, 64)]
    iters = 5 if args.quick else args.iters
    hidden, ffn = 256, 512
    print(f"device={args.device} hidden={hidden} ffn={ffn} topk=2, median of {iters} fwd+bwd")
    print("layer = MoELayer fwd+bwd; router = the router module alone (probs.sum() backward)")
    print(
        f"{'tokens':>7} {'experts':>7} {'layer TopK ms':>14} {'layer DPSL ms':>14} {'ratio':>7} "
        f"{'router TopK ms':>15} {'router DPSL ms':>15} {'DPSL share':>11}"
    )
    for tokens, experts in grid:
        x = torch.randn(tokens // 4, 4, hidden, device=args.device)
        base = build(TopKRouter, experts, hidden, ffn, False, args.device)
        dpsl = build(DPSLRouter, experts, hidden, ffn, True, args.device)
        dpsl.load_state_dict(base.state_dict())
        tb, td = time_pair(base, dpsl, x, iters, warmup=3)
        rb, rd = time_pair(_RouterOnly(base.router), _RouterOnly(dpsl.router), x, iters, warmup=3)
        # DPSL share: the extra router time as a fraction of the stock layer's fwd+bwd
        print(
            f"{tokens:>7} {experts:>7} {tb * 1e3:>14.2f} {td * 1e3:>14.2f} {td / tb:>7.3f} "
            f"{rb * 1e3:>15.2f} {rd * 1e3:>15.2f} {(rd - rb) / tb:>11.3f}"
        )


if __name__ == "__main__":
    main()
