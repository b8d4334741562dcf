"""The sum of several optimizers' updates, each with its own state and meta-parameters.

``Sum([a, b])`` steps every part from the same parameters and gradients and adds their
updates:

    theta <- theta + (a's update) + (b's update)

With each part inside :class:`~l2o.optim.AdaptiveScale`, every part's step size is
adapted online by its own hypergradient (the cosine between the new gradient and that
part's last update): a part whose direction keeps making progress on this task grows,
one whose steps the gradient turns against shrinks. The shipped generalist is
``Sum([AdaptiveScale(LSTM), AdaptiveScale(Adam)])``: the learned LSTM where its rule
fits the task, Adam's per-coordinate normalisation where it does not (ill-conditioned
quadratics, convnets). Meta-training trains every part's meta-parameters together
(the LSTM's weights, Adam's hyperparameters, each adaptation rate).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .base import DifferentiableOptimizer, Params, State


class Sum(DifferentiableOptimizer):
    """Adds the updates of ``parts`` (optimizers, or their :meth:`config` dicts), all stepped on the same gradients.

    Args:
        parts: two or more optimizers; their meta-parameters are this optimizer's, as
            ``parts.0.*``, ``parts.1.*`` ...
    """

    def __init__(self, parts: list[DifferentiableOptimizer | dict]) -> None:
        super().__init__()
        from . import from_config  # late import: the package registers this class

        if not isinstance(parts, (list, tuple)) or len(parts) < 2:
            raise ValueError(f"Sum adds the updates of two or more optimizers, got {parts!r}")
        built = [from_config(p) if isinstance(p, dict) else p for p in parts]
        for p in built:
            if not isinstance(p, DifferentiableOptimizer):
                raise TypeError(f"Sum adds DifferentiableOptimizers or their config dicts, got {type(p).__name__}")
        self.parts = nn.ModuleList(built)

    def config(self) -> dict[str, Any]:
        return {"type": "Sum", "parts": [p.config() for p in self.parts]}

    def hparams(self) -> dict[str, float]:
        return {f"{i}.{k}": v for i, p in enumerate(self.parts) for k, v in p.hparams().items()}

    def learn(self, names: list[str] | None) -> "Sum":
        """Train only ``names`` in every part that has them (each name must belong to some part); None = all."""
        if names is None:
            for p in self.parts:
                p.learn(None)
            return self
        known = [set(_names(p)) for p in self.parts]
        unknown = [n for n in names if not any(n in k for k in known)]
        if unknown:
            raise ValueError(f"Sum has no hyperparameter {unknown[0]!r}; its parts have "
                             f"{', '.join(sorted(set().union(*known))) or 'none'}")
        for p, k in zip(self.parts, known):
            p.learn([n for n in names if n in k])
        return self

    def project_(self) -> None:
        for p in self.parts:
            p.project_()

    def default_update_every(self, truncation: int, horizon: int) -> int:
        return min(p.default_update_every(truncation, horizon) for p in self.parts)

    # ------------------------------------------------------------------ protocol
    def init(self, params: Params) -> State:
        return {"parts": [p.init(params) for p in self.parts]}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        stepped, states = [], []
        for part, s in zip(self.parts, state["parts"]):
            new, s = part.step(params, grads, s)
            stepped.append(new)
            states.append(s)
        out = {}
        for k, p in params.items():
            total = stepped[0][k]
            for new in stepped[1:]:
                total = total + (new[k] - p)
            out[k] = total
        return out, {"parts": states}


def _names(opt: DifferentiableOptimizer) -> list[str]:
    """The hyperparameter names ``opt.learn`` accepts."""
    if isinstance(opt, Sum):
        return sorted({n for p in opt.parts for n in _names(p)})
    base = getattr(opt, "base", None)
    return [*opt._kinds, *(_names(base) if isinstance(base, DifferentiableOptimizer) else [])]
