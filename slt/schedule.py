"""How sparse a thresholded layer is at each optimizer step, and when its mask is refreshed."""

from __future__ import annotations

from typing import Any


def scheduled_sparsity(step: int, settings: dict[str, Any]) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3 between
    start_step t0 and end_step t1; s_i before, s_f after. `linear` uses the first power,
    `constant` is s_f throughout."""
    initial, final = settings["initial_sparsity"], settings["final_sparsity"]
    start, end = settings["start_step"], settings["end_step"]
    if settings["schedule"] == "constant" or step >= end:
        return final
    if step <= start:
        return initial
    remaining = 1.0 - (step - start) / (end - start)
    power = 3 if settings["schedule"] == "cubic" else 1
    return final + (initial - final) * remaining**power


def refresh_due(step: int, settings: dict[str, Any]) -> bool:
    """Masks are recomputed before steps 1, 1 + update_every, 1 + 2 * update_every, ...: a
    function of the step alone, so a resumed run refreshes exactly where the original did."""
    return (step - 1) % settings["update_every"] == 0


def last_refresh(step: int, settings: dict[str, Any]) -> int:
    """The step whose scheduled sparsity the masks of step `step` were computed for."""
    return step - (step - 1) % settings["update_every"]
