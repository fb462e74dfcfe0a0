"""Validation-time routing statistics: full softmax probabilities, expert loads and per-group usage.

While enabled (during evaluation), each router records the softmax over all experts
``[num_tokens, num_experts]`` of the logits its ``gating`` returned in this forward (fp32; what DPSL
shapes and the paper's Fig. 7 histograms show), the top-k ``routing_map`` its forward returned (a
forward hook, ``register_forward_hook``) and the tokens' group ids (aligned with the router's
``s``-major flattening by ``token_groups.shard_token_group_ids``). The logits are taken from the
router's own ``gating`` call (wrapped on the instance), not recomputed from its input: the AC
router's gating depends on the previous MoE layer's assignment, which only its forward knows.
Padding rows set with the token groups (``dpsl_token_groups(..., padding_mask=)``, e.g.
``LLaVAModel``'s right padding) are left out, as the router losses leave them out. ``summarize``
gathers them on rank 0 and computes, per MoE layer, the metrics of
``megatron_dpsl.metrics.routing``: CoV of expert loads, routing entropy, distance to the prior
(Eq. 4 per expert) and per-group expert usage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RoutingStats:
    """Records routing on this rank while ``enabled``; see the module docstring."""

    def __init__(
        self, model: torch.nn.Module | list[torch.nn.Module], max_tokens_per_layer: int = 16384
    ):
        from megatron.core.transformer.moe.router import TopKRouter

        chunks = model if isinstance(model, (list, tuple)) else [model]
        self.routers = [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]
        # each router's layer number across the whole model: pipeline stages hold different layers
        self._layer_keys = [
            index if router.layer_number is None else router.layer_number
            for index, router in enumerate(self.routers)
        ]
        for router in self.routers:
            if getattr(router.config, "moe_router_force_load_balancing", False):
                # routing() then sees random logits in place of gating()'s
                raise ValueError("RoutingStats: needs moe_router_force_load_balancing unset")
        self.max_tokens = max_tokens_per_layer
        self.enabled = False
        self._records: dict[int, list[dict]] = {}
        self._logits: dict[int, torch.Tensor] = {}  # gating()'s output of the forward in progress
        self._handles = [
            router.register_forward_hook(self._hook(index), with_kwargs=True)
            for index, router in enumerate(self.routers)
        ]
        for index, router in enumerate(self.routers):
            router.gating = self._recording_gating(index, router.gating)

    def _recording_gating(self, index: int, gating):
        def recording_gating(input: torch.Tensor) -> torch.Tensor:
            logits = gating(input)
            if self.enabled:
                self._logits[index] = logits.detach()
            return logits

        return recording_gating

    def _hook(self, index: int):
        def hook(router, args, kwargs, output) -> None:
            if self.enabled:
                self._record(index, router, self._logits.pop(index), output[1])

        return hook

    def remove(self) -> None:
        """Detach the hooks from the routers and give them back their own ``gating``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for router in self.routers:
            router.__dict__.pop("gating", None)
        self._logits = {}

    def _record(self, index: int, router, logits: torch.Tensor, routing_map: torch.Tensor) -> None:
        num_experts = routing_map.shape[-1]
        scores = torch.softmax(logits.detach().reshape(-1, num_experts).float(), dim=-1)
        routing_map = routing_map.detach()
        ids, pad = _router_token_groups(router)
        if pad is not None:
            # padding rows (LLaVA's right padding) are no tokens of the batch; the losses skip them
            keep = ~pad.to(scores.device)
            scores, routing_map = scores[keep], routing_map[keep]
            ids = None if ids is None else ids[keep.to(ids.device)]
        self._records.setdefault(index, []).append(
            {
                "probs": scores.cpu(),
                "routing_map": routing_map.cpu(),
                "group_ids": None if ids is None else ids.cpu(),
            }
        )

    def reset(self) -> None:
        self._records = {}

    def _local(self) -> dict[int, dict]:
        """This rank's records by layer number."""
        out = {}
        for index, key in enumerate(self._layer_keys):
            recs = self._records.get(index, [])
            if not recs:
                continue
            probs = torch.cat([r["probs"] for r in recs])
            rmap = torch.cat([r["routing_map"] for r in recs])
            ids = (
                None if recs[0]["group_ids"] is None else torch.cat([r["group_ids"] for r in recs])
            )
            out[key] = {"probs": probs, "routing_map": rmap, "group_ids": ids}
        return out

    def gather(self) -> list[dict] | None:
        """Every rank's records, concatenated per MoE layer on rank 0 in layer order (None
        elsewhere). Collective over the world: pipeline stages contribute their own layers.

        Ranks whose tokens duplicate another rank's (tensor-parallel peers without sequence
        parallelism) are left out, so each token counts once.
        """
        from megatron.core import parallel_state

        dup = parallel_state.get_tensor_model_parallel_rank() > 0 and not (
            self.routers and self.routers[0].config.sequence_parallel
        )
        mine = None if dup else self._local()
        if dist.get_world_size() == 1:
            everything = [mine]
        else:
            everything = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(mine, everything, dst=0)
        if dist.get_rank() != 0:
            return None
        keys = sorted({key for r in everything if r is not None for key in r})
        layers = []
        for key in keys:
            parts = [r[key] for r in everything if r is not None and key in r]
            ids = (
                None
                if parts[0]["group_ids"] is None
                else torch.cat([p["group_ids"] for p in parts])
            )
            layers.append(
                {
                    "probs": torch.cat([p["probs"] for p in parts]),
                    "routing_map": torch.cat([p["routing_map"] for p in parts]),
                    "group_ids": ids,
                }
            )
        return layers


def _router_token_groups(router):
    """The group ids and padding flags set for this forward, ``[s_local * b]`` each and aligned with
    the router's flattened logits, or None (no token groups, no padding flags)."""
    from megatron_dpsl.parallel.token_groups import (
        get_dpsl_token_groups,
        shard_token_group_ids,
        shard_token_padding,
    )

    groups = get_dpsl_token_groups()
    if groups is None:
        return None, None
    layout = dict(
        tp_group=router.tp_group,
        cp_group=router.cp_group,
        sequence_parallel=router.config.sequence_parallel,
    )
    return shard_token_group_ids(groups, **layout), shard_token_padding(groups, **layout)


def summarize(
    layers: list[dict], alpha: torch.Tensor, num_groups: int, max_tokens: int = 16384
) -> dict:
    """Per-layer metrics and a probability sample for the histograms (rank 0, plain tensors).

    ``alpha``: the prior the distance is measured to (``[E]`` or ``[G, E]``; group priors need group
        ids).
    Returns ``{"layers": [{"cov", "entropy", "prior_distance" [E], "mean_prior_distance", "load"
    [E], "group_usage" [G, E], "probs_sample" [n, E], "group_ids_sample" [n]}], plus layer means}``.
    """
    from megatron_dpsl import metrics

    out = []
    for layer in layers:
        if layer is None:
            continue
        probs, rmap, ids = layer["probs"], layer["routing_map"], layer["group_ids"]
        num_experts = probs.shape[-1]
        load = rmap.sum(0).float()
        use_groups = alpha.dim() == 2 and ids is not None
        dist_e = metrics.prior_distance(
            probs.double(), alpha.double(), group_ids=ids if use_groups else None
        )
        usage = (
            torch.zeros(num_groups, num_experts)
            if ids is None
            else metrics.group_expert_usage(rmap, ids, num_groups)
        )
        step = max(1, probs.shape[0] // max_tokens)
        out.append(
            {
                "cov": float(metrics.expert_load_cov(load)),
                "entropy": float(metrics.routing_entropy(probs)),
                "prior_distance": dist_e.float(),
                "mean_prior_distance": float(dist_e.mean()),
                "ks_distance": float(
                    metrics.ks_distance(
                        probs.double(), alpha.double(), group_ids=ids if use_groups else None
                    ).mean()
                ),
                "load": load,
                "group_usage": usage,
                "probs_sample": probs[::step][:max_tokens].clone(),
                "group_ids_sample": None if ids is None else ids[::step][:max_tokens].clone(),
            }
        )
    mean = lambda key: sum(layer[key] for layer in out) / max(1, len(out))  # noqa: E731
    return {
        "layers": out,
        "cov": mean("cov"),
        "entropy": mean("entropy"),
        "prior_distance": mean("mean_prior_distance"),
        "ks_distance": mean("ks_distance"),
    }
