"""Patch Sampling Schedule (PSS): keep a fraction ``rho`` of a ViT's patch tokens per iteration.

Tokens are ranked by **magnitude**: the L2 norm of each token's patch embedding (the output of the patch
projection, before the position embedding is added). Why this score: it is free (the embedding is computed
anyway, no extra network or attention pass), it is defined before the first block so the dropped tokens
never cost a block, and it does not depend on where a patch sits (the position embedding would add the
same norm pattern to every image). The input is normalised dB, so the norm of a (learned) linear map of a
patch grows with how far the patch departs from the data-set mean backscatter in the directions the
projection amplifies: very dark (calm water, shadow) or very bright (urban, ridges) and strongly textured
patches score high, patches of average backscatter score low. The top ``ceil(rho * N)`` are kept, in their
original (row-major) order, each with its own position embedding; the rest never enter the transformer
blocks, so the block compute falls roughly linearly with ``rho``.

``rho`` follows a schedule stepped once per optimizer update:

- ``none``: ``rho = 1`` (the plain ViT, the baseline);
- ``linear(rho_min, rho_max)``: ``rho_min`` at the first update, ``rho_max`` at the last;
- ``cyclic(rho_min, rho_max, period)``: a triangle wave, ``rho_min`` at the start of each period,
  ``rho_max`` at its middle (update ``period / 2``), back to ``rho_min`` at its end.
"""
from __future__ import annotations

import math

import torch

from sarwmix.errors import ConfigError

PSS_KINDS: tuple[str, ...] = ("none", "linear", "cyclic")
TOKEN_SCORE = "l2_norm_of_patch_embedding"  # named in logs and analysis outputs


class PatchSchedule:
    """Kept-token fraction ``rho`` as a function of the optimizer update ``t``; ``step()`` once per update.

    Args:
        kind: ``none | linear | cyclic``.
        rho_min, rho_max: range of ``rho``, ``0 < rho_min <= rho_max <= 1``.
        total_steps: updates of the whole run (the length of the linear schedule).
        period: updates per cycle (cyclic only, at least 2). ``from_run`` defaults it to one epoch.
    The state (``t`` and the configuration) round-trips through ``state_dict``/``load_state_dict``, so a
    resumed run continues the schedule exactly.
    """

    def __init__(self, kind: str = "none", rho_min: float = 0.2, rho_max: float = 1.0, total_steps: int = 1,
                 period: int | None = None) -> None:
        if kind not in PSS_KINDS:
            raise ConfigError(f"--pss {kind!r}: expected one of {', '.join(PSS_KINDS)}")
        if not 0.0 < rho_min <= rho_max <= 1.0:
            raise ConfigError(f"--pss_min {rho_min} / --pss_max {rho_max}: need 0 < pss_min <= pss_max <= 1")
        if kind == "cyclic" and (period is None or period < 2):
            raise ConfigError(f"--pss_period {period}: a cyclic schedule needs a period of at least 2 updates")
        if total_steps < 1:
            raise ConfigError(f"a schedule needs at least one update, got total_steps={total_steps}")
        self.kind, self.rho_min, self.rho_max = kind, float(rho_min), float(rho_max)
        self.total_steps, self.period, self.t = int(total_steps), period, 0

    @classmethod
    def from_run(cls, kind: str, rho_min: float, rho_max: float, updates_per_epoch: int, epochs: int,
                 period: int | None = None) -> PatchSchedule:
        """The schedule of a run of ``epochs`` x ``updates_per_epoch`` updates; cyclic period default: one
        epoch of updates (at least 2)."""
        if kind != "cyclic" and period is not None:
            raise ConfigError(f"--pss_period {period} sets the cycle of --pss cyclic; with --pss {kind} it would "
                              f"be ignored")
        if kind == "cyclic" and period is None:
            period = max(2, updates_per_epoch)
        return cls(kind, rho_min, rho_max, updates_per_epoch * epochs, period if kind == "cyclic" else None)

    def _lerp(self, f: float) -> float:
        # Written as a weighted sum so that f = 0 and f = 1 give rho_min and rho_max exactly.
        return self.rho_min * (1.0 - f) + self.rho_max * f

    def value(self, t: int | None = None) -> float:
        """``rho`` at update ``t`` (default: the current one)."""
        t = self.t if t is None else t
        if self.kind == "none":
            return 1.0
        if self.kind == "linear":
            return self._lerp(min(t / max(self.total_steps - 1, 1), 1.0))
        phase = (t % self.period) / self.period
        return self._lerp(1.0 - abs(2.0 * phase - 1.0))

    @property
    def rho(self) -> float:
        return self.value()

    def step(self) -> float:
        """Advance one update; returns the new ``rho``."""
        self.t += 1
        return self.value()

    def state_dict(self) -> dict:
        return {"t": self.t, "kind": self.kind, "rho_min": self.rho_min, "rho_max": self.rho_max,
                "total_steps": self.total_steps, "period": self.period}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``t``; the stored configuration must be this one (else the schedule would not continue).

        Raises:
            ConfigError naming each setting that differs between the checkpoint and this run.
        """
        mine = self.state_dict()
        diff = [f"{k}: checkpoint {state[k]!r}, now {mine[k]!r}" for k in mine
                if k != "t" and k in state and state[k] != mine[k]]
        if diff:
            raise ConfigError("resume with the patch schedule of the checkpoint (--pss, --pss_min, --pss_max, "
                              "--pss_period, --epochs, batch): " + "; ".join(diff))
        self.t = int(state["t"])

    def __repr__(self) -> str:
        return (f"PatchSchedule({self.kind}, rho {self.rho_min}..{self.rho_max}, total {self.total_steps}, "
                f"period {self.period}, t={self.t})")


def keep_count(n_tokens: int, rho: float) -> int:
    """Number of tokens kept: ``ceil(rho * N)``, at least 1 and at most N.

    The 1e-9 absorbs float error in ``rho * N`` (0.7 * 10 = 7.000000000000001 must keep 7, not 8).
    """
    return max(1, min(n_tokens, math.ceil(rho * n_tokens - 1e-9)))


def token_scores(tokens: torch.Tensor) -> torch.Tensor:
    """The ranking score of each token: L2 norm of its patch embedding, (B, N, D) -> (B, N) float32."""
    return tokens.detach().float().norm(dim=-1)


def select_tokens(tokens: torch.Tensor, rho: float) -> torch.Tensor | None:
    """Indices of the tokens to keep.

    Args:
        tokens: (B, N, D) patch embeddings, before the position embedding.
        rho: kept fraction in (0, 1].
    Returns:
        (B, K) long, K = ``keep_count(N, rho)``, the K largest ``token_scores`` of each sample in ascending
        (row-major) index order; None when every token is kept (the plain ViT path, bit for bit).
    """
    n = tokens.shape[1]
    k = keep_count(n, rho)
    if k == n:
        return None
    top = token_scores(tokens).topk(k, dim=1).indices
    return top.sort(dim=1).values
