"""Modality ids for every ``LLaVAModel`` forward: a forward pre-hook sets them, no user code
computes them.

``attach_llava_token_groups(model)`` registers a ``with_kwargs`` forward pre-hook on the unwrapped
``LLaVAModel``. Each call it reads ``input_ids``, ``images``, ``num_image_tiles`` and
``image_token_index`` (positional or keyword, through DDP / ``Float16Module``), recomputes
``_preprocess_data``'s layout (``megatron_dpsl.models.llava_modality``) and sets the ``[b, S]``
group ids and padding flags with ``set_dpsl_token_groups``: every ``DPSLRouter`` then shards them
like the combined embeddings (SP, sbhd CP) and leaves the padding rows out of DPSL and of Megatron's
aux losses. Task priors: pass ``dpsl_task_ids=[b] int`` to the model's forward; the hook takes it
out before ``LLaVAModel`` sees it::

    handle = attach_llava_token_groups(model, ModalityGroups(vision=0, text=1, num_tasks=4))
    output, loss_mask = model(images, input_ids, position_ids, attention_mask, labels=labels,
                              loss_mask=loss_mask, num_image_tiles=tiles, dpsl_task_ids=subset)

``build_llava_model`` attaches it for you.
"""

from __future__ import annotations

import inspect

import torch

from megatron_dpsl.models.llava_modality import (
    ModalityGroups,
    check_image_inputs,
    check_image_token_index,
    llava_token_layout,
    with_valid_lengths,
)
from megatron_dpsl.parallel.token_groups import reset_dpsl_token_groups, set_dpsl_token_groups

TASK_IDS_KWARG = "dpsl_task_ids"


def unwrap_llava(model):
    """The ``LLaVAModel`` inside ``model`` (a one-chunk list, DDP, ``Float16Module``...)."""
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(
                f"attach_llava_token_groups: one model chunk expected, got {len(model)} "
                "(virtual pipeline stages cannot follow the group ids yet)"
            )
        model = model[0]
    inner = model
    while not isinstance(inner, LLaVAModel) and hasattr(inner, "module"):
        inner = inner.module
    if not isinstance(inner, LLaVAModel):
        raise TypeError(f"attach_llava_token_groups: no LLaVAModel inside {type(model).__name__}")
    return inner


def check_llava_groups(llava, groups: ModalityGroups) -> None:
    """One-line errors for a model the ids cannot describe (no vision encoder, group count).

    A pipeline stage after the first has no vision encoder of its own (its embeddings come from the
    first stage): it still computes the ids, from the ``input_ids`` its forward gets.
    """
    config = llava.language_model.config
    wanted = getattr(config, "moe_dpsl_num_token_groups", None)
    if wanted is not None and groups.vision is not None and llava.pre_process:
        if not llava.add_encoder:
            raise ValueError(
                "modality priors need a vision encoder: the LLaVAModel has add_encoder=False; "
                "use ModalityGroups(vision=None) for task-only groups"
            )
    if wanted is not None and wanted != groups.num_groups:
        raise ValueError(
            f"ModalityGroups give {groups.num_groups} groups but the language model's DPSL prior "
            "has "
            f"{wanted} (moe_dpsl_num_groups / moe_dpsl_group_alphas)"
        )


def _shard_factor(llava) -> int:
    """The multiple ``_process_embedding_token_parallel`` pads (0.19) or asserts (0.16) the length
    to."""
    cp, tp = llava.context_parallel_lm, llava.tensor_model_parallel_size_lm
    factor = 2 * cp if cp > 1 else 1
    return factor * tp if llava.sequence_parallel_lm else factor


# megatron-core 0.19's forward arguments whose layout the modality ids do not follow yet
_UNFOLLOWED = {
    "imgs_sizes": "dynamic resolution",
    "num_frames": "video frames",
    "sound_clips": "sound",
}


def _check_call(llava, call: dict) -> bool:
    """False when this forward gets no ids (no ``input_ids`` and no group priors: a middle pipeline
    stage of ``examples/multimodal``); one-line errors for forwards the ids cannot describe."""
    if call.get("input_ids") is None:
        if getattr(llava.language_model.config, "moe_dpsl_num_token_groups", None) is None:
            return False
        raise ValueError(
            "LLaVA token groups: this forward got no input_ids (a pipeline stage without data?); "
            "group priors need them on every stage"
        )
    for name, what in _UNFOLLOWED.items():
        if call.get(name) is not None:
            raise ValueError(
                f"LLaVA token groups: {name}= ({what}) is not followed by the modality ids yet; "
                "detach the hook (build_llava_model(..., token_groups=None)) to run without them"
            )
    packed = call.get("packed_seq_params")
    if packed is not None and packed.qkv_format == "thd" and llava.context_parallel_lm > 1:
        raise ValueError(
            "LLaVA token groups: THD (packed) sequences with context parallelism are not followed "
            "by the modality ids yet (TE slices them for CP); use sbhd"
        )
    return True


class _Hook:
    """Pre-hook: this call's layout -> ``set_dpsl_token_groups(ids, padding_mask=pad)``; post-hook:
    the previous ids back. A recompute in the backward pass replays the ids its checkpoint recorded
    in the forward (``megatron_dpsl.parallel.token_groups``), so nothing needs them after the
    forward."""

    def __init__(self, groups: ModalityGroups, llava) -> None:
        self.groups = groups
        self.signature = inspect.signature(type(llava).forward)
        self.tokens = []  # reset tokens of the forwards in flight (a stack: re-entrant calls)

    def before(self, llava, args, kwargs):
        kwargs = dict(kwargs)
        task_ids = kwargs.pop(TASK_IDS_KWARG, None)
        call = self.signature.bind(llava, *args, **kwargs).arguments
        generating = any(call.get(k) is not None for k in ("inference_context", "inference_params"))
        if generating or not _check_call(llava, call):
            # generation with a KV cache (no router loss; later steps are not LLaVA's layout), or a
            # stage without input_ids and without group priors: no ids, no padding flags
            self.tokens.append(set_dpsl_token_groups(None))
        else:
            ids, pad = self.ids(llava, call, task_ids)
            self.tokens.append(set_dpsl_token_groups(ids, padding_mask=pad))
        return args, kwargs

    def after(self, llava, args, output):
        reset_dpsl_token_groups(self.tokens.pop())

    def ids(self, llava, call: dict, task_ids: torch.Tensor | None):
        """``([b, S] long ids, [b, S] bool padding)`` for one forward call's bound arguments."""
        input_ids, images = call["input_ids"], call.get("images")
        tiles, index = call.get("num_image_tiles"), call.get("image_token_index")
        if index is None:
            index = llava.image_token_index
        else:
            check_image_token_index(index, llava.language_model.vocab_size)
        if tiles is None and images is not None:  # LLaVAModel's own default: one tile per image
            tiles = torch.ones(images.shape[0], dtype=torch.int, device=input_ids.device)
        tiles = None if tiles is None else torch.as_tensor(tiles, device=input_ids.device)
        check_image_inputs(input_ids, tiles, None if images is None else images.shape[0], index)
        layout = llava_token_layout(
            input_ids,
            tiles,
            img_seq_len=llava.img_seq_len,
            image_token_index=index,
            max_sequence_length=llava._language_max_sequence_length,
            pad_to_max_length=llava._language_is_pipeline_parallel,
            shard_factor=_shard_factor(llava),
        )
        packed = call.get("packed_seq_params")
        if packed is not None and packed.qkv_format == "sbhd" and packed.cu_seqlens_q is not None:
            layout = with_valid_lengths(layout, packed.cu_seqlens_q)
        return self.groups.group_ids(layout, task_ids), layout.is_pad


class LLaVATokenGroupsHandle:
    """What ``attach_llava_token_groups`` returns: ``remove()`` detaches both hooks."""

    def __init__(self, hook: _Hook, handles) -> None:
        self.hook, self._handles = hook, handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def attach_llava_token_groups(model, groups: ModalityGroups | None = None):
    """Compute and set the modality/task group ids of every forward of ``model``'s ``LLaVAModel``.

    Args:
        model: an ``LLaVAModel``, possibly wrapped (DDP, ``Float16Module``) or a one-chunk list.
        groups: the row → group mapping (default ``ModalityGroups()``: vision 0, text 1).

    Returns:
        an ``LLaVATokenGroupsHandle`` (``handle.remove()`` detaches the hooks).
    """
    groups = ModalityGroups() if groups is None else groups
    llava = unwrap_llava(model)
    check_llava_groups(llava, groups)
    hook = _Hook(groups, llava)
    handles = [
        llava.register_forward_pre_hook(hook.before, with_kwargs=True),
        llava.register_forward_hook(hook.after),
    ]
    return LLaVATokenGroupsHandle(hook, handles)
