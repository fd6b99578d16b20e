"""Backscatter units: linear power to dB and back, with the floor that keeps no-data zeros finite.

Every model input is dB; products stored as linear power (SEN12-FLOOD, GRD scenes) are converted with
``10 * log10(max(power, LINEAR_FLOOR))``, so a no-data zero becomes -60 dB instead of ``-inf``. The weight
map goes the other way, from the raw dB batch to linear power.
"""
from __future__ import annotations

import numpy as np
import torch

from sarwmix.constants import LINEAR_FLOOR


def linear_to_db(power: np.ndarray) -> np.ndarray:
    """``10 * log10(max(power, LINEAR_FLOOR))`` as float32; zeros (no-data) map to exactly -60 dB, NaN stays NaN.

    Computed in float64: 1e-6 has no exact float32 value, and its float32 log would be -60.000004.
    """
    return (10.0 * np.log10(np.maximum(power.astype(np.float64), LINEAR_FLOOR))).astype(np.float32)


def db_to_linear(sar_db: torch.Tensor) -> torch.Tensor:
    """dB -> linear power, computed in float32 whatever the input dtype."""
    return torch.pow(10.0, sar_db.float() / 10.0)
