"""The grouped CPU punica wrapper that :mod:`llm_platform.engine.cpu_lora` installs (see its doc).

Imported by vLLM (by qualified name) only once that plugin has checked the platform and version.

How a LoRA layer runs here, per step:

* When the adapter mapping changes, the batch's rows are grouped by slot once (:class:`Grouping`).
  If every slot's rows are contiguous (prefill of one request, a batch of one adapter) the groups
  are row ranges of the batch itself; otherwise the LoRA rows are gathered once per layer in slot
  order, computed there, and added back with one ``index_add_``. Rows with slot -1 are never read
  or written.
* Per slot and layer, the adapter's weights are trimmed to its real rank (the non-zero extent, so
  vLLM's padding to ``max_lora_rank`` costs nothing) and stored transposed and contiguous, A of all
  slices side by side. This copy is made once per slot assignment, not per token or step. A layer
  or slice the adapter does not target has rank 0 and is skipped.
* Then, per active slot: one ``mm`` for the shrink of all slices and one ``addmm_`` per slice for
  the expand, written in place into the output rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from llm_platform.engine.cpu_lora import WRAPPER


@dataclass(frozen=True)
class Grouping:
    """The rows of a batch per LoRA slot (rows with slot -1 belong to no group)."""

    rows: int
    """Rows in the mapping."""
    groups: tuple[tuple[int, int, int], ...]
    """``(slot, start, end)``: a row range of the batch, or of the gathered rows when ``perm`` is set."""
    perm: torch.Tensor | None
    """Batch rows of every LoRA row, in slot order; None when each slot's rows are already contiguous."""

    @classmethod
    def of(cls, indices: torch.Tensor) -> Grouping:
        n = indices.numel()
        if n == 0 or not bool((indices >= 0).any()):
            return cls(n, (), None)
        order = torch.argsort(indices, stable=True)
        slots, counts = torch.unique_consecutive(indices[order], return_counts=True)
        slots, counts = slots.tolist(), counts.tolist()
        skip = counts[0] if slots[0] < 0 else 0  # -1 sorts first
        perm = order[skip:]
        rows = perm.tolist()
        groups, start = [], 0
        for slot, count in zip(slots, counts):
            if slot >= 0:
                groups.append((slot, start, start + count))
                start += count
        if all(rows[e - 1] - rows[s] + 1 == e - s for _, s, e in groups):
            return cls(n, tuple((slot, rows[s], rows[e - 1] + 1) for slot, s, e in groups), None)
        return cls(n, tuple(groups), perm)

    def check(self, n: int, what: str) -> None:
        if n != self.rows:
            raise RuntimeError(f"{WRAPPER}: {what} has {n} rows but the LoRA mapping has {self.rows}")


def _extent(nonzero: torch.Tensor) -> int:
    """1 + the last True index of a 1-D bool tensor, 0 when none."""
    where = torch.nonzero(nonzero)
    return int(where[-1, 0].item()) + 1 if where.numel() else 0


def _rank_a(a: torch.Tensor, slot: int) -> int:
    """Rank extent of ``a[slot]`` ([1, R, in]): rows past it are zero."""
    return _extent(a[slot, 0].any(dim=1))


def _rank_b(b: torch.Tensor, slot: int) -> int:
    """Rank extent of ``b[slot]`` ([1, out, R]): columns past it are zero."""
    return _extent(b[slot, 0].any(dim=0))


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with grouped, rank-trimmed, -1-safe LoRA ops (see the module doc)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: torch.device | str, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._tokens = Grouping(0, (), None)
        self._sampled = Grouping(0, (), None)
        self._slot_ids: tuple | None = None
        self._plans: dict[tuple, object] = {}

    # --- metadata -------------------------------------------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs) -> None:
        # vLLM calls this whenever the mapping or the slot layout changes. The base metadata
        # (token/sampler/embedding indices) is still computed: vLLM's embedding layer reads it.
        # The sgmv prefill metadata is not: nothing here uses it.
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        self.is_prefill = bool(mapping.is_prefill)
        slot_ids = tuple(lora_index_to_id)
        if slot_ids != self._slot_ids:  # slots got other adapters: their weights are read again
            self._slot_ids = slot_ids
            self._plans.clear()
        self._tokens = Grouping.of(self.token_lora_indices)
        self._sampled = Grouping.of(self.sampler_indices)
        self.no_lora = not self._tokens.groups

    def _plan(self, kind: str, slot: int, a: tuple | None, b: tuple | None, sizes: tuple | None = None):
        """Per slot and layer: the slot's weights, rank-trimmed, transposed and contiguous (cached).

        ``linear``: ``(A_cat [in, sum r], [(c0, c1, offset, size, B_T [r, size])])`` or None;
        ``shrink``: ``(A_cat, [(c0, c1, slice index)])``; ``expand``: ``[(slice, r, offset, size, B_T)]``.
        """
        key = (kind, slot, (a or b)[0].data_ptr(), self._slot_ids[slot] if self._slot_ids else None)
        if key in self._plans:
            return self._plans[key]
        n = len(a if a is not None else b)
        ranks = [min(_rank_a(a[i], slot) if a is not None else 1 << 30,
                     _rank_b(b[i], slot) if b is not None else 1 << 30) for i in range(n)]
        a_parts, pieces, col, offset = [], [], 0, 0
        for i in range(n):
            r = ranks[i]
            size = sizes[i] if sizes is not None else 0
            if r:
                if a is not None:
                    a_parts.append(a[i][slot, 0, :r])
                b_t = b[i][slot, 0, :, :r].T.contiguous() if b is not None else None
                pieces.append((col, col + r, offset, size, b_t, i))
                col += r
            offset += size
        if not pieces:
            plan = None
        elif kind == "linear":
            plan = (torch.cat(a_parts).T.contiguous(), [p[:5] for p in pieces])
        elif kind == "shrink":
            plan = (torch.cat(a_parts).T.contiguous(), [(c0, c1, i) for c0, c1, _, _, _, i in pieces])
        else:
            plan = [(i, c1 - c0, off, size, b_t) for c0, c1, off, size, b_t, i in pieces]
        self._plans[key] = plan
        return plan

    def _active(self, grouping: Grouping, kind: str, a, b, sizes=None):
        return [(start, end, plan) for slot, start, end in grouping.groups
                if (plan := self._plan(kind, slot, a, b, sizes)) is not None]

    # --- ops ------------------------------------------------------------------------------------
    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices, *, buffer=None, **kwargs) -> None:
        """``y[rows, slice i] += x[rows] @ A_i[slot].T @ B_i[slot].T * scale``, per active slot; other rows untouched."""
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        g = self._tokens
        active = self._active(g, "linear", tuple(lora_a_stacked), tuple(lora_b_stacked), tuple(output_slices))
        if not active:
            return
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        g.check(x2.shape[0], "the LoRA input")
        xs, out = (x2, y2) if g.perm is None else \
            (x2.index_select(0, g.perm), y2.new_zeros(g.perm.numel(), y2.shape[1]))
        for start, end, (a_cat, slices) in active:
            h = torch.mm(xs[start:end].to(a_cat.dtype), a_cat)
            if scale != 1.0:
                h.mul_(scale)
            rows = out[start:end]
            for c0, c1, offset, size, b_t in slices:
                rows[:, offset:offset + size].addmm_(h[:, c0:c1].to(out.dtype), b_t.to(out.dtype))
        if g.perm is not None:
            y2.index_add_(0, g.perm, out)

    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs) -> None:
        """``y[i][rows, :r] += x[rows] @ A_i[slot].T * scale`` for each slice i; other rows untouched."""
        g = self._tokens
        active = self._active(g, "shrink", tuple(lora_a_stacked), None)
        if not active:
            return
        x2 = x.view(-1, x.shape[-1])
        g.check(x2.shape[0], "the LoRA input")
        if g.perm is None:
            xs, outs = x2, [y[i] for i in range(len(lora_a_stacked))]
        else:
            xs = x2.index_select(0, g.perm)
            outs = [y[i].new_zeros(g.perm.numel(), y[i].shape[-1]) for i in range(len(lora_a_stacked))]
        for start, end, (a_cat, cols) in active:
            h = torch.mm(xs[start:end].to(a_cat.dtype), a_cat)
            if scale != 1.0:
                h.mul_(scale)
            for c0, c1, i in cols:
                outs[i][start:end, :c1 - c0] += h[:, c0:c1]
        if g.perm is not None:
            for i, out in enumerate(outs):
                y[i].index_add_(0, g.perm, out)

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked, output_slices, offset_start: int = 0,
                   add_inputs: bool = True, **kwargs) -> None:
        """``y[rows, offset_start + slice i] += x[i][rows, :r] @ B_i[slot].T``; other rows untouched."""
        if not add_inputs:
            raise NotImplementedError(f"{WRAPPER}.add_expand: only add_inputs=True is used on CPU")
        g = self._tokens
        active = self._active(g, "expand", None, tuple(lora_b_stacked), tuple(output_slices))
        if not active:
            return
        y2 = y.view(-1, y.shape[-1])
        g.check(y2.shape[0], "the LoRA output")
        if g.perm is None:
            xs, out = x, y2
        else:
            xs = [x[i].index_select(0, g.perm) for i in range(len(lora_b_stacked))]
            out = y2.new_zeros(g.perm.numel(), y2.shape[1])
        for start, end, slices in active:
            rows = out[start:end]
            for i, r, offset, size, b_t in slices:
                col = offset_start + offset
                rows[:, col:col + size].addmm_(xs[i][start:end, :r].to(out.dtype), b_t.to(out.dtype))
        if g.perm is not None:
            y2.index_add_(0, g.perm, out)

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs) -> None:
        """``y[rows] += x[rows, :r] @ B[slot].T``; x holds the rows' LoRA-A embeddings (looked up by vLLM)."""
        if not add_inputs:
            raise NotImplementedError(f"{WRAPPER}.add_lora_embedding: only add_inputs=True is used on CPU")
        g = self._tokens
        active = self._active(g, "expand", None, (lora_b_stacked,), (y.shape[-1],))
        if not active:
            # No active adapter has embedding weights: nothing to add. This is also the case where vLLM
            # embeds only the token-id rows of a batch holding prompt embeddings (x then has fewer rows
            # than the mapping, and no row-to-adapter map exists for them).
            return
        g.check(x.shape[0], "the embedding LoRA input (prompt embeddings batched with embedding-LoRA adapters?)")
        xs, out = (x, y) if g.perm is None else (x.index_select(0, g.perm), y.new_zeros(g.perm.numel(), y.shape[1]))
        for start, end, ((_, r, _, _, b_t),) in active:
            out[start:end].addmm_(xs[start:end, :r].to(out.dtype), b_t.to(out.dtype))
        if g.perm is not None:
            y.index_add_(0, g.perm, out)

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs) -> None:
        """``y[rows] += x[rows] @ A[slot].T @ B[slot].T * scale`` over the sampled rows (lm_head LoRA)."""
        g = self._sampled
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        width = min(y2.shape[1], lora_b_stacked.shape[-2])  # vocab padding may differ (as in vLLM's op)
        active = self._active(g, "linear", (lora_a_stacked,), (lora_b_stacked[:, :, :width],), (width,))
        if not active:
            return
        g.check(x2.shape[0], "the lm_head LoRA input")
        xs, out = (x2, y2) if g.perm is None else \
            (x2.index_select(0, g.perm), y2.new_zeros(g.perm.numel(), y2.shape[1]))
        for start, end, (a_cat, ((c0, c1, _, _, b_t),)) in active:
            h = torch.mm(xs[start:end].to(a_cat.dtype), a_cat) * scale
            out[start:end, :width].addmm_(h.to(out.dtype), b_t.to(out.dtype))
        if g.perm is not None:
            y2.index_add_(0, g.perm, out)
