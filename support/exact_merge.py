"""Merging ΔW into W0 so that unmerging gives W0 back bit for bit, without a copy of W0.

lora.py's LoRALinear.merge (§4.1: "explicitly compute and store W = W0 + BA") and unmerge
(§4.1: "recover W0 by subtracting BA") use it: in floating point (W0 + ΔW) - ΔW is W0 almost
everywhere, and this module keeps exactly what is needed for the rest.
"""

import torch


def fp32_delta(A, B, scaling):
    """ΔW = scaling · B A in fp32, (out, in). Summed one rank-1 term at a time: IEEE elementwise
    ops whose bits depend on no BLAS kernel or TF32 setting, so unmerge recomputes exactly the
    ΔW that merge added, on any device."""
    A, B = A.float(), B.float() * scaling
    delta = torch.zeros(B.size(0), A.size(1), device=A.device)
    for j in range(A.size(0)):
        delta += B[:, j, None] * A[None, j]  # (out, 1) * (1, in)
    return delta


class ExactMerge:
    """W0 += ΔW in place, undoable bit for bit without a copy of W0.

    (W0 + ΔW) - ΔW rounds back to W0 almost everywhere; this keeps A and B as they were (tiny)
    and only the entries of W0 that do not round back (a share roughly proportional to
    |ΔW| / |W0|, a few percent when ΔW is small next to W0)."""

    def __init__(self, w0, A, B, scaling):
        self.A, self.B, self.scaling = A.detach().clone(), B.detach().clone(), scaling
        delta = fp32_delta(self.A, self.B, scaling)
        merged = (w0.float() + delta).to(w0.dtype)
        back = (merged.float() - delta).to(w0.dtype)
        lost = (bits(back) != bits(w0)).flatten().nonzero().squeeze(1)
        self.lost, self.values = lost.int(), w0.flatten()[lost].clone()  # int32: half the memory
        w0.copy_(merged)

    def undo(self, w):
        """w (the merged rows) -> W0, in place."""
        if self.values.dtype != w.dtype:
            raise ValueError(f"weights were merged in {self.values.dtype} and are now {w.dtype}: "
                             f"W0 cannot be restored exactly; unmerge before changing dtype")
        delta = fp32_delta(self.A.to(w.device), self.B.to(w.device), self.scaling)
        rows = (w.float() - delta).to(w.dtype)
        rows.view(-1)[self.lost.to(w.device, torch.long)] = self.values.to(w.device)
        w.copy_(rows)


def bits(t):
    """The raw bits of t, so that comparisons are exact (-0.0 != 0.0, NaN == same NaN)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
