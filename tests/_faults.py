"""A network with a fault injected, shared by the failure-isolation tests."""

from __future__ import annotations

import torch


class FailingModel(torch.nn.Module):
    """Wraps a network; its ``fail_on_call``-th call raises ``RuntimeError(message)``.

    Defined in a module of its own so that it pickles into the reconstruction process.
    """

    def __init__(self, inner, *, fail_on_call: int, message: str) -> None:
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, 0
        self.fail_on_call, self.message = fail_on_call, message

    def forward_parts(self, counts, scale):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError(self.message)
        return self.inner.forward_parts(counts, scale)
