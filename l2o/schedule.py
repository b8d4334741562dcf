"""Meta-training schedules: a curriculum of phases run by one command (``--schedule``).

A schedule is a comma-separated list of phases ``TRUNCATION:META_STEPS[@OUTER_LR]``;
``"20:60,100:200@3e-4"`` is 60 meta-steps of 20-step truncations at the run's
``--outer-lr``, then 200 meta-steps that backpropagate through 100-step truncations
(the whole unroll, for a 100-step horizon) at outer learning rate 3e-4. The run's
``--meta-steps`` is the sum of the phases' lengths.

Each phase after the first starts from the best-validated weights so far (the run
validates at the end of every phase), with a fresh outer optimizer and its own cosine
decay (``--lr-schedule``) over its own meta-steps: the same as running the phases as
separate commands chained with ``--init-from`` (a later phase draws its optimizees from its own meta-step numbers), in one
resumable run. Short truncations
learn fast but are biased toward greedy, short-horizon behaviour; a final phase over the
full horizon removes that bias once the weights are good enough for its long, noisier
meta-gradients to be stable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FORMAT = "TRUNCATION:META_STEPS[@OUTER_LR], e.g. 20:60,100:200@3e-4"


@dataclass(frozen=True)
class Phase:
    """One phase: ``meta_steps`` meta-steps from meta-step ``start``, truncation ``truncation``."""

    truncation: int
    meta_steps: int
    outer_lr: float | None  # None: the run's --outer-lr
    start: int = 0

    @property
    def end(self) -> int:
        return self.start + self.meta_steps


def _positive_int(text: str, what: str, phase: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip().lstrip("+"):
        raise ValueError(f"--schedule phase {phase!r}: {what} must be a positive integer, got {text!r} ({FORMAT})")
    return value


def parse(spec: str) -> list[Phase]:
    """The phases of ``spec``; raises ``ValueError`` with a one-line message naming the bad part."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--schedule is empty; give phases {FORMAT}")
    phases, start = [], 0
    for raw in spec.split(","):
        part = raw.strip()
        body, at, lr_text = part.partition("@")
        trunc_text, colon, steps_text = body.partition(":")
        if not part or not colon or (at and not lr_text):
            raise ValueError(f"--schedule phase {part!r} is not {FORMAT}")
        truncation = _positive_int(trunc_text, "the truncation", part)
        steps = _positive_int(steps_text, "the number of meta-steps", part)
        lr = None
        if at:
            try:
                lr = float(lr_text)
            except ValueError:
                lr = math.nan
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"--schedule phase {part!r}: the outer learning rate must be a positive number, "
                                 f"got {lr_text!r}")
        phases.append(Phase(truncation, steps, lr, start))
        start += steps
    return phases


def total(phases: list[Phase]) -> int:
    """Meta-steps of the whole schedule."""
    return phases[-1].end if phases else 0


def phase_at(phases: list[Phase], meta_step: int) -> int:
    """Index of the phase that runs meta-step ``meta_step`` (0-based; the last phase past the end)."""
    for k, ph in enumerate(phases):
        if meta_step < ph.end:
            return k
    return len(phases) - 1
