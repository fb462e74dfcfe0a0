"""Padding flags set with the token groups (``set_dpsl_token_groups(ids, padding_mask=...)``): the
API's checks and the reset. Their effect on the router losses is tested through a real
``LLaVAModel`` (tests/unit/models/test_vlm.py) and their sharding under SP/CP by
tests/distributed/test_llava_sharding.py."""

from __future__ import annotations

import pytest
import torch

from megatron_dpsl.parallel.token_groups import (
    TokenGroups,
    get_dpsl_token_groups,
    reset_dpsl_token_groups,
    set_dpsl_token_groups,
    shard_token_padding,
)


def test_padding_must_be_shaped_like_the_ids():
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(
        ValueError,
        match=r"padding_mask must be a bool tensor shaped like group_ids \(2, 5\), got \(5, 2\)",
    ):
        set_dpsl_token_groups(ids, padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    assert get_dpsl_token_groups() is None


def test_set_and_reset_and_unsharded_flags_are_s_major():
    ids = torch.zeros(2, 3, dtype=torch.long)
    pad = torch.tensor([[0, 0, 1], [0, 1, 1]])
    token = set_dpsl_token_groups(ids, padding_mask=pad)
    try:
        groups = get_dpsl_token_groups()
        assert groups.padding_mask.dtype == torch.bool
        # the router flattens [s, b] logits s-major: rows (s0,b0), (s0,b1), (s1,b0), ...
        assert shard_token_padding(groups).tolist() == [False, False, False, True, True, True]
    finally:
        reset_dpsl_token_groups(token)
    assert get_dpsl_token_groups() is None
    assert shard_token_padding(TokenGroups(ids)) is None
