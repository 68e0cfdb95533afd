"""What happens after a step whose loss or gradients are not finite (`--nonfinite`).

Such a step is never applied. The decision is made on the device: the global gradient norm,
which gradient clipping already reduces over all ranks, is NaN or inf when any rank's gradient
is (a NaN or inf loss makes it so), and the fused optimizer then skips its update on that flag
(with --fp16 the grad scaler skips on its own). So every rank agrees, and nothing waits.

The host learns of it one step late: `record` reads the flag of the previous step once the
current one is queued on the device, so the read never stalls it. It then logs the event (the
step, the ranks whose loss was not finite, each rank's loader position) and applies the
policy: `skip` goes on, and stops the run once `max_skipped` steps in a row were skipped;
`stop` stops at the first. Stopping saves nothing and names the last checkpoint written before
the trouble began. `flush` settles the current step at once, before a save.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.distributed import gather_from_every_rank
from utils.errors import UserError


@dataclass
class _Step:
    number: int
    nonfinite: torch.Tensor  # global, 0-dim bool, on the device
    local_loss: torch.Tensor  # this rank's, 0-dim, on the device
    position: dict[str, int]  # this rank's loader position after the step's batches


class NonFiniteGuard:
    def __init__(
        self,
        policy: str,
        max_skipped: int,
        log_event: Callable[[int, dict[str, Any]], None],
        checkpoint_before: Callable[[int], Path | None],
    ) -> None:
        self.policy = policy
        self.max_skipped = max_skipped
        self.log_event = log_event
        self.checkpoint_before = checkpoint_before
        self.in_a_row = 0
        self._pending: _Step | None = None

    def record(
        self, step: int, nonfinite: torch.Tensor, local_loss: torch.Tensor, position: dict
    ) -> None:
        """After step `step` is queued: settle the step before it, keep this one for later."""
        previous, self._pending = self._pending, _Step(step, nonfinite, local_loss, position)
        if previous is not None:
            self._settle(previous)

    def flush(self) -> None:
        """Settle the last recorded step now (a host sync): before a save, and at the end."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._settle(pending)

    def _settle(self, step: _Step) -> None:
        if not bool(step.nonfinite):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        # a collective: the ranks all settle the same steps together
        ranks = gather_from_every_rank(
            {"loss_finite": bool(torch.isfinite(step.local_loss)), **step.position}
        )
        stopping = self.policy == "stop" or self.in_a_row >= self.max_skipped
        self.log_event(
            step.number,
            {
                "event": "nonfinite_step_stopped" if stopping else "nonfinite_step_skipped",
                "skipped_in_a_row": self.in_a_row,
                "ranks_with_nonfinite_loss": [
                    r for r, s in enumerate(ranks) if not s["loss_finite"]
                ],
                "loader_positions": [
                    {k: v for k, v in s.items() if k != "loss_finite"} for s in ranks
                ],
            },
        )
        if stopping:
            raise UserError(self._stop_message(step.number))

    def _stop_message(self, step: int) -> str:
        first = step - self.in_a_row + 1
        steps = f"step {step}" if first == step else f"steps {first}-{step}"
        why = "--nonfinite stop" if self.policy == "stop" else f"--max_skipped {self.max_skipped}"
        good = self.checkpoint_before(first)
        again = f"resume from {good}" if good else "no checkpoint came before it: start again"
        return (
            f"{steps}: loss or gradients not finite ({why}); stopped without saving; {again} "
            "with a lower --lr or --grad_clip (metrics.jsonl names each rank's loader position)"
        )
