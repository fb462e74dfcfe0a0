"""Micro-batches from a byte corpus (``megatron_dpsl.train.corpus``), sharded over data-parallel
ranks.

Sample ``i`` of a split is the window ``tokens[o_i : o_i + seq_length + 1]`` at an offset drawn from
``numpy.random.default_rng((seed, split, i))``: every rank and every run with the same seed sees the
same samples, whatever the parallel layout. The global batch of iteration ``it`` holds samples
``it * global_batch_size + [0, global_batch_size)``; as in Megatron-LM's pretraining sampler, each
micro-batch step takes ``micro_batch_size * dp`` consecutive samples and data-parallel rank ``r``
the ``r``-th run of ``micro_batch_size`` of them. Validation always reads the same first samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

_SPLIT_CODE = {"train": 0, "valid": 1}


@dataclass
class ByteCorpus:
    """Token and group-id arrays (uint8, equal length) of one split."""

    tokens: np.ndarray
    groups: np.ndarray

    @classmethod
    def load(cls, data_path: str, split: str) -> ByteCorpus:
        tok = os.path.join(data_path, f"{split}_tokens.bin")
        grp = os.path.join(data_path, f"{split}_groups.bin")
        for path in (tok, grp):
            if not os.path.isfile(path):
                raise ValueError(  # a flag error (one line, exit 2), not a traceback
                    f"--data-path: {path} not found; build a corpus with python -m "
                    f"megatron_dpsl.train.corpus --out {data_path}"
                )
        tokens, groups = np.fromfile(tok, dtype=np.uint8), np.fromfile(grp, dtype=np.uint8)
        if tokens.shape != groups.shape:
            raise ValueError(f"--data-path: {tok} and {grp} differ in length")
        return cls(tokens, groups)

    @classmethod
    def mock(
        cls, num_tokens: int, seed: int, vocab_size: int = 256, num_groups: int = 2
    ) -> ByteCorpus:
        rng = np.random.default_rng(seed)
        groups = np.repeat(rng.integers(0, num_groups, size=num_tokens // 256 + 1), 256)[
            :num_tokens
        ]
        return cls(
            rng.integers(0, vocab_size, size=num_tokens).astype(np.uint8), groups.astype(np.uint8)
        )


def causal_attention_mask(seq_length: int, device) -> torch.Tensor:
    """``[1, 1, s, s]`` bool, True = masked. Passed explicitly: Megatron's default mask is built on
    "cuda"."""
    return torch.triu(
        torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1
    )


class BatchSampler:
    """Deterministic micro-batches of one split for one data-parallel rank."""

    def __init__(
        self,
        corpus: ByteCorpus,
        split: str,
        *,
        seq_length: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        device,
    ):
        if corpus.tokens.size < seq_length + 2:
            raise ValueError(
                f"--seq-length {seq_length} is longer than the {split} split "
                f"({corpus.tokens.size} tokens)"
            )
        self.corpus, self.split = corpus, split
        self.seq_length, self.mbs, self.gbs = seq_length, micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.seed, self.device = dp_rank, dp_size, seed, device
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self._mask = causal_attention_mask(seq_length, device)
        self._positions = (
            torch.arange(seq_length, device=device).unsqueeze(0).expand(micro_batch_size, -1)
        )

    def _offset(self, sample: int) -> int:
        rng = np.random.default_rng((self.seed, _SPLIT_CODE[self.split], sample))
        return int(rng.integers(0, self.corpus.tokens.size - self.seq_length - 1))

    def micro_batch(self, iteration: int, microbatch: int) -> dict[str, torch.Tensor]:
        """The micro-batch ``microbatch`` of global batch ``iteration`` held by this rank.

        Returns ``tokens``/``labels``/``position_ids``/``group_ids`` ``[b, s]`` int64, ``loss_mask``
        ``[b, s]`` float32 and ``attention_mask`` ``[1, 1, s, s]`` bool.
        """
        first = (
            iteration * self.gbs + microbatch * self.mbs * self.dp_size + self.dp_rank * self.mbs
        )
        rows_t, rows_g = [], []
        for sample in range(first, first + self.mbs):
            o = self._offset(sample)
            rows_t.append(self.corpus.tokens[o : o + self.seq_length + 1])
            rows_g.append(self.corpus.groups[o : o + self.seq_length])
        window = torch.from_numpy(np.stack(rows_t).astype(np.int64))
        groups = torch.from_numpy(np.stack(rows_g).astype(np.int64))
        return {
            "tokens": window[:, :-1].to(self.device),
            "labels": window[:, 1:].to(self.device),
            # the group of the input token: the router routes the hidden state of that position
            "group_ids": groups.to(self.device),
            "loss_mask": torch.ones(self.mbs, self.seq_length, device=self.device),
            "position_ids": self._positions,
            "attention_mask": self._mask,
        }

    def iterator(self, iteration: int) -> Iterator[dict[str, torch.Tensor]]:
        """The ``num_microbatches`` micro-batches of one global batch (a Megatron data iterator)."""
        return (self.micro_batch(iteration, m) for m in range(self.num_microbatches))
