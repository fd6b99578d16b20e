"""Patch Sampling Schedule (PSS): keep a fraction ``rho`` of a ViT's patch tokens per iteration.

Tokens are ranked by **magnitude**: the L2 norm of each token's patch embedding (the output of the patch
projection, before the position embedding). Large-norm tokens carry the most signal energy after the
learned projection; for SAR this favours bright, textured patches over flat dark ones. The top
``ceil(rho * N)`` are kept, in their original (row-major) order, with their own position embeddings; the
rest never enter the transformer blocks, so compute falls roughly linearly with ``rho``.

``rho`` follows a schedule stepped once per optimizer update:

- ``constant(rho_max)`` — the baseline (``--pss none``: ``rho = 1``);
- ``linear(rho_min, rho_max)`` — from ``rho_min`` at the first update to ``rho_max`` at the last;
- ``cyclic(rho_min, rho_max, period)`` — a triangle wave: ``rho_min`` at the start of each period,
  ``rho_max`` at its middle, back to ``rho_min`` at its end.
"""
from __future__ import annotations

import math

import torch

PSS_KINDS: tuple[str, ...] = ("none", "linear", "cyclic")


class PatchSchedule:
    """Schedule of the kept-token fraction; ``step()`` once per optimizer update, resumable.

    Args:
        kind: ``none | linear | cyclic``.
        total_steps: number of updates of the whole run (linear schedule length).
        period: updates per cycle (cyclic); default: one epoch's worth is a sensible choice.
    """

    def __init__(self, kind: str = "none", rho_min: float = 0.2, rho_max: float = 1.0, total_steps: int = 1,
                 period: int = 100) -> None:
        if kind not in PSS_KINDS:
            raise ValueError(f"pss must be one of {PSS_KINDS}, got {kind!r}")
        if not 0.0 < rho_min <= rho_max <= 1.0:
            raise ValueError(f"need 0 < pss_min <= pss_max <= 1, got {rho_min}, {rho_max}")
        if period < 2:
            raise ValueError(f"pss_period must be at least 2 updates, got {period}")
        self.kind, self.rho_min, self.rho_max = kind, rho_min, rho_max
        self.total_steps, self.period, self.t = max(total_steps, 1), period, 0

    def value(self, t: int | None = None) -> float:
        """``rho`` at update ``t`` (default: the current one)."""
        t = self.t if t is None else t
        if self.kind == "none":
            return 1.0
        span = self.rho_max - self.rho_min
        if self.kind == "linear":
            return self.rho_min + span * min(t / max(self.total_steps - 1, 1), 1.0)
        phase = (t % self.period) / self.period
        return self.rho_min + span * (1.0 - abs(2.0 * phase - 1.0))

    def step(self) -> float:
        """Advance one update; returns the new ``rho``."""
        self.t += 1
        return self.value()

    def state_dict(self) -> dict:
        return {"t": self.t, "kind": self.kind, "rho_min": self.rho_min, "rho_max": self.rho_max,
                "total_steps": self.total_steps, "period": self.period}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])


def keep_count(n_tokens: int, rho: float) -> int:
    """Number of tokens kept: ``ceil(rho * N)``, at least 1 and at most N."""
    return max(1, min(n_tokens, math.ceil(rho * n_tokens - 1e-9)))


def select_tokens(tokens: torch.Tensor, rho: float) -> torch.Tensor | None:
    """Indices (B, K) of the ``ceil(rho * N)`` largest-norm tokens of (B, N, D), ascending; None when all kept."""
    n = tokens.shape[1]
    k = keep_count(n, rho)
    if k == n:
        return None
    top = tokens.detach().float().norm(dim=-1).topk(k, dim=1).indices
    return top.sort(dim=1).values
