"""The `--slt_config` JSON file: which sparse method, on which projections, with which settings.

Every key has a default (METHOD_DEFAULTS); an unknown key, method or value is an UserError that
names the file and the key, raised before the model is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import UserError

# The Llama projections a sparse layer can replace; embeddings and lm_head always stay dense.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("cubic", "linear", "constant")

_SCHEDULE_DEFAULTS: dict[str, Any] = {
    "initial_sparsity": 0.0,
    "final_sparsity": 0.5,
    "start_step": 0,
    "end_step": 1000,
    "schedule": "cubic",
    "update_every": 100,
}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "magnitude": dict(_SCHEDULE_DEFAULTS),
    "supermask": _SCHEDULE_DEFAULTS
    | {
        "schedule": "constant",
        "update_every": 1,
        "weight_init": "signed_constant",
        "score_init": "kaiming_uniform",
    },
    "nm": {"n": 2, "m": 4, "srste_lambda": 2e-4},
    # r and alpha: null = the SLTrain paper's LLaMA setting for the model's hidden size.
    "sltrain": {"r": None, "alpha": None, "delta": 0.03},
}
# SLTrain's LLaMA runs (Han et al. 2024): hidden size -> (r, alpha).
SLTRAIN_PAPER_SETTINGS = {512: (128, 32.0), 768: (256, 16.0), 1024: (256, 16.0), 2048: (512, 8.0)}


def _fraction(value: Any) -> bool:
    return _number(value) and 0 <= value < 1


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


# key -> (is the value valid, what a valid value is)
_RULES: dict[str, tuple[Any, str]] = {
    "initial_sparsity": (_fraction, "a number in [0, 1)"),
    "final_sparsity": (_fraction, "a number in [0, 1)"),
    "start_step": (lambda v: _count(v, 0), "an integer >= 0"),
    "end_step": (lambda v: _count(v, 1), "an integer >= 1"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {list(SCHEDULES)}"),
    "update_every": (lambda v: _count(v, 1), "an integer >= 1"),
    "weight_init": (lambda v: v in ("kaiming", "signed_constant"), "kaiming or signed_constant"),
    "score_init": (
        lambda v: v in ("kaiming_uniform", "kaiming_normal"),
        "kaiming_uniform or kaiming_normal",
    ),
    "n": (lambda v: _count(v, 1), "an integer >= 1"),
    "m": (lambda v: _count(v, 2), "an integer >= 2"),
    "srste_lambda": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "r": (lambda v: v is None or _count(v, 1), "an integer >= 1 or null"),
    "alpha": (lambda v: v is None or (_number(v) and v > 0), "a number > 0 or null"),
    "delta": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
}


@dataclass(frozen=True)
class SLTConfig:
    method: str
    targets: tuple[str, ...] = PROJECTIONS
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "targets": list(self.targets), **self.settings}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "slt config") -> SLTConfig:
        """Validate a mapping (a parsed file, or the copy a checkpoint holds) and fill in the
        defaults."""

        def bad(message: str) -> UserError:
            return UserError(f"--slt_config {source}: {message}")

        if not isinstance(values, dict):
            raise bad("must be a JSON object")
        method = values.get("method")
        if method not in METHOD_DEFAULTS:
            raise bad(f"method must be one of {list(METHOD_DEFAULTS)} (got {method!r})")
        defaults = METHOD_DEFAULTS[method]
        unknown = sorted(set(values) - set(defaults) - {"method", "targets"})
        if unknown:
            raise bad(f"unknown keys {unknown} for method {method}; known: {sorted(defaults)}")
        targets = values.get("targets", list(PROJECTIONS))
        if not (isinstance(targets, list) and targets and set(targets) <= set(PROJECTIONS)):
            raise bad(f"targets must be a non-empty list drawn from {list(PROJECTIONS)}")
        settings = defaults | {k: v for k, v in values.items() if k in defaults}
        for key, value in settings.items():
            valid, expected = _RULES[key]
            if not valid(value):
                raise bad(f"{key} must be {expected} (got {value!r})")
        _check_combination(settings, bad)
        return cls(method, tuple(targets), settings)


def _check_combination(settings: dict[str, Any], bad) -> None:
    if "end_step" in settings and settings["schedule"] != "constant":
        if settings["end_step"] <= settings["start_step"]:
            raise bad("end_step must be greater than start_step")
    if "n" in settings and settings["n"] >= settings["m"]:
        raise bad(f"n must be smaller than m (got {settings['n']}:{settings['m']})")


def load_slt_config(path: str) -> SLTConfig:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--slt_config {path} does not exist; give a JSON file (docs/sparse.md)")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"--slt_config {path} is not UTF-8 text; give a JSON file") from err
    except json.JSONDecodeError as err:
        raise UserError(f"--slt_config {path} is not valid JSON ({err})") from err
    return SLTConfig.from_dict(values, source=path)


def sltrain_rank_and_alpha(settings: dict[str, Any], hidden_size: int) -> tuple[int, float]:
    """The configured r and alpha, or the paper's setting for the nearest hidden size."""
    nearest = min(SLTRAIN_PAPER_SETTINGS, key=lambda size: abs(size - hidden_size))
    paper_r, paper_alpha = SLTRAIN_PAPER_SETTINGS[nearest]
    r = settings["r"] if settings["r"] is not None else paper_r
    alpha = settings["alpha"] if settings["alpha"] is not None else paper_alpha
    return r, float(alpha)


def check_dense_start(config: SLTConfig) -> None:
    """--init_from gives dense weights. SLTrain's W = B A + S starts from B = 0 and a random
    support, and no decomposition of dense weights is attempted here."""
    if config.method == "sltrain":
        raise UserError(
            "--init_from with slt method sltrain: its low-rank plus sparse weight trains from its "
            "own initialization; prune a pretrained model with magnitude or nm, or give it a "
            "supermask"
        )
