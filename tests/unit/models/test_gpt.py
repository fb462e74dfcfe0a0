"""``megatron_dpsl.models.gpt.build_gpt_model``: the one GPTModel builder of the trainer and the
launcher.

Real ``GPTModel``s on CPU with the shims of tests/megatron_cpu.py.
"""

from __future__ import annotations

import pytest
import torch
from support.configs import gpt_config
from support.megatron_cpu import init_single_process


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    init_single_process()
    yield


def _config(**over):
    return gpt_config(**over)


def _routers(model):
    from megatron.core.transformer.moe.router import TopKRouter

    return [type(m).__name__ for m in model.modules() if isinstance(m, TopKRouter)]


@pytest.mark.parametrize("spec", ["layer", "decoder_block"])
def test_moe_model_has_dpsl_routers_and_gets_gpt_kwargs(spec):
    from megatron_dpsl.models.gpt import build_gpt_model

    # qk_l2_norm in the config too: megatron-core 0.19 refuses an L2Norm spec on a config without it
    model = build_gpt_model(
        _config(qk_l2_norm=True),
        spec=spec,
        spec_kwargs={"qk_l2_norm": True},
        vocab_size=40,
        max_sequence_length=8,
        share_embeddings_and_output_weights=False,
    )
    assert _routers(model) == ["DPSLRouter", "DPSLRouter"]
    assert model.embedding.word_embeddings.weight.shape == (
        40,
        16,
    )  # GPTModel's keyword arguments arrive
    assert model.output_layer.weight is not model.embedding.word_embeddings.weight
    # spec_kwargs reach Megatron's spec function: L2Norm on queries and keys in both layers
    assert sum(type(m).__name__ == "L2Norm" for m in model.modules()) == 4
    tokens = torch.randint(0, 40, (2, 8))
    logits = model(
        tokens,
        torch.arange(8).expand(2, 8),
        torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), 1),
    )
    assert logits.shape == (2, 8, 40) and torch.isfinite(logits).all()


def test_decoder_block_follows_moe_layer_freq_and_dense_layer_spec_has_no_router():
    from megatron_dpsl.models.gpt import build_gpt_model

    mixed = build_gpt_model(
        _config(moe_layer_freq=[0, 1]), spec="decoder_block", vocab_size=32, max_sequence_length=8
    )
    assert _routers(mixed) == ["DPSLRouter"]  # the per-layer block spec: layer 0 dense, layer 1 MoE
    dense_cfg = _config(
        num_moe_experts=None, moe_router_load_balancing_type="aux_loss", moe_router_topk=2
    )
    dense = build_gpt_model(dense_cfg, vocab_size=32, max_sequence_length=8)
    assert _routers(dense) == [] and len(dense.decoder.layers) == 2


def test_unknown_spec_names_the_argument_and_choices():
    from megatron_dpsl.models.gpt import build_gpt_model

    with pytest.raises(
        ValueError, match=r"spec must be one of \['layer', 'decoder_block'\], got 'block'"
    ):
        build_gpt_model(_config(), spec="block", vocab_size=32, max_sequence_length=8)
