"""The grouped CPU punica wrapper that :mod:`llm_platform.engine.cpu_lora` installs (see its doc).

Imported by vLLM (by qualified name) only once that plugin has checked the platform and version.
"""

from __future__ import annotations

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from llm_platform.engine.cpu_lora import WRAPPER


def _groups(indices: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
    """``[(slot, rows)]`` for every slot >= 0 in ``indices``; rows is a slice when contiguous."""
    if indices.numel() == 0:
        return []
    order = torch.argsort(indices, stable=True)
    slots, counts = torch.unique_consecutive(indices[order], return_counts=True)
    groups, start = [], 0
    for slot, count in zip(slots.tolist(), counts.tolist()):
        if slot >= 0:
            rows = order[start:start + count]
            first, last = rows[0].item(), rows[-1].item()
            groups.append((slot, slice(first, last + 1) if last - first + 1 == count else rows))
        start += count
    return groups


def _add_rows(y: torch.Tensor, rows: slice | torch.Tensor, delta: torch.Tensor, add: bool = True) -> None:
    """``y[rows] += delta`` (or ``=``), ``y`` possibly a column slice of a larger tensor."""
    if isinstance(rows, slice):
        if add:
            y[rows] += delta
        else:
            y[rows] = delta
    elif add:
        y.index_add_(0, rows, delta.to(y.dtype))
    else:
        y.index_copy_(0, rows, delta.to(y.dtype))


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with grouped, rank-trimmed, -1-safe LoRA ops (see the module doc)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._token_groups: list[tuple[int, slice | torch.Tensor]] = []
        self._sampler_groups: list[tuple[int, slice | torch.Tensor]] = []
        self._slot_layout: tuple | None = None
        self._ranks: dict[tuple, int] = {}

    # --- metadata -------------------------------------------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs) -> None:
        # vLLM calls this when the mapping or the slot layout changes. The base metadata
        # (token/sampler/embedding indices) is still computed: vLLM's embedding layer reads it.
        # The sgmv prefill metadata is not: nothing here uses it.
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        self.is_prefill = bool(mapping.is_prefill)
        layout = tuple(lora_index_to_id)
        if layout != self._slot_layout:  # a slot got new weights: its ranks are read again
            self._slot_layout = layout
            self._ranks.clear()
        self._token_groups = _groups(self.token_lora_indices)
        self._sampler_groups = _groups(self.sampler_indices)
        self.no_lora = not self._token_groups

    def _rank(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> int:
        """Non-zero rank extent of slot ``slot`` in ``a`` ([slots, 1, R, in]) and/or ``b`` ([slots, 1, out, R]).

        Rows of A past it and columns of B past it are zero, so trimming to it is exact.
        """
        key = (slot, None if a is None else a.data_ptr(), None if b is None else b.data_ptr())
        rank = self._ranks.get(key)
        if rank is None:
            extents = []
            if a is not None:  # rows of A[slot]: [1, R, in]
                extents.append(_extent(a[slot].any(dim=2).any(dim=0)))
            if b is not None:  # columns of B[slot]: [1, out, R]
                extents.append(_extent(b[slot].any(dim=1).any(dim=0)))
            rank = self._ranks[key] = min(extents)
        return rank

    def _check_rows(self, n: int, indices: torch.Tensor, what: str) -> None:
        if n != indices.numel():
            raise RuntimeError(f"{WRAPPER}: {what} has {n} rows but the LoRA mapping has {indices.numel()}")

    # --- ops ------------------------------------------------------------------------------------
    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs) -> None:
        """``y[i][rows] += x[rows] @ A_i[slot].T * scale`` for each slice i; other rows untouched."""
        if not self._token_groups:
            return
        x = x.view(-1, x.shape[-1])
        self._check_rows(x.shape[0], self.token_lora_indices, "the LoRA input")
        for slot, rows in self._token_groups:
            xs = x[rows]
            for i, a in enumerate(lora_a_stacked):
                r = self._rank(slot, a, None)
                if r:
                    h = torch.matmul(xs.to(a.dtype), a[slot, 0, :r].T)
                    _add_rows(y[i][:, :r], rows, h * scale if scale != 1.0 else h)

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked, output_slices, offset_start: int = 0,
                   add_inputs: bool = True, **kwargs) -> None:
        """``y[rows, slice i] += x[i][rows] @ B_i[slot].T`` for each slice i; other rows untouched."""
        if not self._token_groups:
            return
        y = y.view(-1, y.shape[-1])
        self._check_rows(y.shape[0], self.token_lora_indices, "the LoRA output")
        for slot, rows in self._token_groups:
            offset = offset_start
            for i, (b, size) in enumerate(zip(lora_b_stacked, output_slices)):
                r = self._rank(slot, None, b)
                if r:
                    h = x[i][rows, :r]
                    _add_rows(y[:, offset:offset + size], rows,
                              torch.matmul(h.to(b.dtype), b[slot, 0, :size, :r].T).to(y.dtype), add_inputs)
                offset += size

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices, *, buffer=None, **kwargs) -> None:
        """``y[rows, slice i] += x[rows] @ A_i[slot].T @ B_i[slot].T * scale``, per active slot and slice."""
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        if not self._token_groups:
            return
        y = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        self._check_rows(x.shape[0], self.token_lora_indices, "the LoRA input")
        for slot, rows in self._token_groups:
            xs = x[rows]
            offset = 0
            for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
                r = self._rank(slot, a, b)
                if r:
                    h = torch.matmul(xs.to(a.dtype), a[slot, 0, :r].T)
                    if scale != 1.0:
                        h = h * scale
                    delta = torch.matmul(h.to(b.dtype), b[slot, 0, :size, :r].T)
                    _add_rows(y[:, offset:offset + size], rows, delta.to(y.dtype))
                offset += size

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs) -> None:
        """``y[rows] += x[rows] @ B[slot].T``; x holds the rows' LoRA-A embeddings (looked up by vLLM)."""
        groups = [(slot, rows, r) for slot, rows in self._token_groups
                  if (r := self._rank(slot, None, lora_b_stacked))]
        if not groups:
            # No active adapter has embedding weights: nothing to add. This is also the case where vLLM
            # embeds only the token-id rows of a batch holding prompt embeddings (then x has fewer rows
            # than the mapping, and no row-to-adapter map exists for it).
            return
        self._check_rows(x.shape[0], self.token_lora_indices,
                         "the embedding LoRA input (prompt embeddings batched with embedding-LoRA adapters?)")
        for slot, rows, r in groups:
            delta = torch.matmul(x[rows, :r].to(lora_b_stacked.dtype), lora_b_stacked[slot, 0, :, :r].T)
            _add_rows(y, rows, delta.to(y.dtype), add_inputs)

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs) -> None:
        """``y[rows] += x[rows] @ A[slot].T @ B[slot].T * scale`` over the sampled rows (lm_head LoRA)."""
        groups = [(slot, rows, r) for slot, rows in self._sampler_groups
                  if (r := self._rank(slot, lora_a_stacked, lora_b_stacked))]
        if not groups:
            return
        y = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        self._check_rows(x.shape[0], self.sampler_indices, "the lm_head LoRA input")
        width = min(y.shape[1], lora_b_stacked.shape[-2])  # vocab padding may differ (as in vLLM's op)
        for slot, rows, r in groups:
            h = torch.matmul(x[rows].to(lora_a_stacked.dtype), lora_a_stacked[slot, 0, :r].T) * scale
            delta = torch.matmul(h.to(lora_b_stacked.dtype), lora_b_stacked[slot, 0, :width, :r].T)
            _add_rows(y[:, :width], rows, delta.to(y.dtype))


def _extent(nonzero: torch.Tensor) -> int:
    """1 + the last True index of a 1-D bool tensor, 0 when none."""
    where = torch.nonzero(nonzero)
    return int(where[-1, 0].item()) + 1 if where.numel() else 0

