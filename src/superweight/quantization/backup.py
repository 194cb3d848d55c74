"""Exact backups of tensors that a temporary model edit overwrites in place."""

from __future__ import annotations

import torch


class TensorBackup:
    """CPU copies of tensors, taken once each before their first in-place change.

    Call :meth:`save` before writing to a tensor. :meth:`restore` copies every saved
    value back bit-exactly. A tensor saved twice is copied once, so the backup keeps at
    most one copy of each tensor.
    """

    def __init__(self) -> None:
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(self, tensor: torch.Tensor) -> None:
        """Copy ``tensor`` to CPU unless it is already saved."""
        key = id(tensor)
        if key not in self._saved:
            self._saved[key] = (tensor, tensor.detach().to("cpu", copy=True))

    def __contains__(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._saved

    def __len__(self) -> int:
        return len(self._saved)

    @property
    def nbytes(self) -> int:
        """Bytes held by the copies."""
        return sum(copy.numel() * copy.element_size() for _, copy in self._saved.values())

    @torch.no_grad()
    def restore(self) -> None:
        """Write every saved value back into its tensor and drop the copies."""
        for tensor, copy in self._saved.values():
            tensor.copy_(copy)
        self._saved.clear()
