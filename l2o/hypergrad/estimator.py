"""One interface for every meta-gradient estimator, and the registry of estimators.

An estimator (learned_optimization's ``GradientEstimator``, with hypertorch's brevity)
turns one inner run, a :class:`Problem`, into meta-gradients in pieces:

    state = est.init(problem, meta_params)           # start of a run (position 0)
    while not est.done(state):
        grads, metrics, state = est.estimate(meta_params, state)
        ...                                          # the caller all-reduces, clips, steps

``estimate`` advances the run by ``every`` inner steps (one *update chunk*) and returns
``d objective_chunk / d meta_params`` for that chunk, where

    objective_chunk = sum_{t in chunk} w_t * m_t  +  outer_loss(params_end, hparams)

(``m_t`` is the step's meta-term, ``w_t`` the problem's ``meta_weights``; the outer loss,
if any, is read at the end of every chunk). With ``every = steps`` there is one chunk
and the estimate is the whole run's hypergradient; with ``every < steps`` the caller may
update ``meta_params`` in place between chunks: the online estimators (TRHO, RTHO,
online PES). This is the only place where online updating is defined.

Everything that persists across chunks (unroll position, inner parameters and
optimizer state, tangents, PES accumulators, the perturbation generator) lives in the
state, and :meth:`Estimator.state_dict` / :meth:`Estimator.load_state_dict` turn it into
tensors for a checkpoint. The caller never looks inside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Sequence

import torch

from .unroll import InnerLoss, OuterLoss, Params, split_term  # noqa: F401 (split_term: re-exported)

Grads = dict[str, torch.Tensor]
Metrics = dict[str, float]


@dataclass
class Problem:
    """One inner run, as every estimator sees it.

    Attributes:
        inner_loss: ``inner_loss(params, hparams, t) -> loss`` or ``(loss, meta_term)``:
            the optimizer descends ``loss``; the meta-objective reads ``meta_term``
            (default: the loss itself). ``t=None`` is not used here: implicit
            differentiation asks for the objective at the run's current step.
        outer_loss: ``outer_loss(params, hparams)``, read at the end of each chunk, or None.
        params: initial inner parameters (may be tensors of ``meta_params``: learned init).
        opt: the differentiable optimizer (its own parameters may be meta-parameters).
        steps: the run's horizon ``T``.
        meta_weights: ``w_t`` for ``t < T`` or None (no per-step terms).
        second_order: differentiate through the inner gradients (exact; off is the L2L paper's
            first-order approximation).
    """

    inner_loss: InnerLoss
    outer_loss: OuterLoss | None
    params: Params
    opt: Any
    steps: int
    meta_weights: Sequence[float] | None = None
    second_order: bool = True


@dataclass
class State:
    """Where an estimator's run stands; ``extra`` holds what only one estimator needs."""

    problem: Problem
    t: int = 0
    params: Params | None = None
    opt_state: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Options:
    """Options every estimator has. Subclasses add their own fields.

    Attributes:
        every: inner steps per :meth:`Estimator.estimate` (one outer update); None = the horizon.
    """

    every: int | None = None

    def validate(self) -> "Options":
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in INT_OPTIONS and v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {v!r}")
            if f.name in FLOAT_OPTIONS and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise ValueError(f"{f.name} must be a positive finite number, got {v!r}")
        return self


INT_OPTIONS = {"every", "truncate", "iters", "particles", "max_directions"}
FLOAT_OPTIONS = {"sigma"}


class Estimator:
    """Base class: the chunking every estimator shares; subclasses implement :meth:`_chunk`.

    Class attributes:
        name: registry name.
        exact: equal to the gradient of the objective (to rounding) on any problem.
        stochastic: a random estimate (PES, ES: unbiased for a Gaussian-smoothed objective).
        truncation_bias: cutting the run into truncations biases the estimate (all but PES).
        options_class: the estimator's own options (a dataclass deriving from :class:`Options`).
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    stochastic: ClassVar[bool] = False
    truncation_bias: ClassVar[bool] = True
    options_class: ClassVar[type[Options]] = Options

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options = (options or self.options_class(**kwargs)).validate()

    # ------------------------------------------------------------------ protocol
    def check(self, problem: Problem, meta_params: dict[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` (one sentence) if this estimator cannot learn ``meta_params`` on ``problem``."""

    def init(self, problem: Problem, meta_params: dict[str, torch.Tensor],
             generator: torch.Generator | None = None) -> State:
        """A state at the start of ``problem``'s run."""
        if problem.outer_loss is None and problem.meta_weights is None:
            raise ValueError("give an outer_loss, meta_weights, or both: the objective is empty")
        return State(problem, 0, problem.params, problem.opt.init(problem.params))

    def estimate(self, meta_params: dict[str, torch.Tensor], state: State) -> tuple[Grads, Metrics, State]:
        """Advance one update chunk; return its meta-gradient, ``{"meta_loss", "finite"}`` and the new state."""
        n = min(self.every(state.problem), state.problem.steps - state.t)
        grads, meta_loss, finite = self._chunk(meta_params, state, n)
        finite = finite and math.isfinite(meta_loss) and all(bool(torch.isfinite(g).all()) for g in grads.values())
        return grads, {"meta_loss": meta_loss, "finite": float(finite)}, state

    def done(self, state: State) -> bool:
        """True when the run is over."""
        return state.t >= state.problem.steps

    def every(self, problem: Problem) -> int:
        return self.options.every or problem.steps

    def _chunk(self, meta_params: dict[str, torch.Tensor], state: State, n: int) -> tuple[Grads, float, bool]:
        """Run ``n`` steps from ``state`` (updating it in place): ``(grads, meta_loss, finite)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, state: State | None) -> dict[str, Any]:
        """What a checkpoint holds of ``state`` (tensors, numbers; never the problem's functions)."""
        if state is None:
            return {}
        return {"t": state.t, "params": state.params, "opt_state": state.opt_state,
                "extra": {k: v for k, v in state.extra.items() if not k.startswith("_")}}

    def load_state_dict(self, state: State, saved: dict[str, Any]) -> State:
        """Put a :meth:`state_dict` back into a state built by :meth:`init` on the same problem."""
        if saved:
            state.t, state.params, state.opt_state = saved["t"], saved["params"], saved["opt_state"]
            state.extra.update(saved["extra"])
        return state


ESTIMATORS: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: add an estimator to :data:`ESTIMATORS` under ``cls.name``."""
    if not cls.name or cls.name in ESTIMATORS:
        raise ValueError(f"estimator name {cls.name!r} is empty or taken")
    ESTIMATORS[cls.name] = cls
    return cls


def make(name: str, **options: Any) -> Estimator:
    """Build a registered estimator; unknown names and options raise ``ValueError`` naming the valid ones."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    known = [f.name for f in fields(cls.options_class)]
    bad = [k for k in options if k not in known]
    if bad:
        raise ValueError(f"estimator {name!r} has no option {bad[0]!r}; options: {', '.join(known)}")
    return cls(**options)


def loss_only(inner_loss: InnerLoss) -> Callable:
    """The inner loss without its meta-term (for code that only descends it)."""
    return lambda p, h, t: split_term(inner_loss(p, h, t))[0]


def zeros_like(meta_params: dict[str, torch.Tensor]) -> Grads:
    return {k: torch.zeros_like(v) for k, v in meta_params.items()}
