"""One unroll, one estimator interface: reverse, truncated, forward, implicit, PES and ES.

Functional entry points (``reverse``, ``truncated``, ``forward``, ``implicit``, ``pes``,
``es``) return a hypergradient for one run; the estimator objects in
:data:`ESTIMATORS` (``make(name, **options)``) give the same estimates chunk by chunk
for an outer loop (see :mod:`l2o.hypergrad.estimator`).
"""
from .estimator import ESTIMATORS, Estimator, Options, Problem, State, make, register
from .forward import Forward, ForwardOptions, ForwardUnroll, forward, forward_online
from .implicit import Implicit, ImplicitOptions, conjugate_gradient, implicit, neumann
from .pes import ES, PES, PESOptions, es, pes
from .reverse import Reverse, Segment, Truncated, TruncatedOptions, reverse, segments, truncated
from .unroll import UnrollResult, detach, unroll

__all__ = ["ES", "ESTIMATORS", "Estimator", "Forward", "ForwardOptions", "ForwardUnroll", "Implicit", "ImplicitOptions",
           "Options", "PES", "PESOptions", "Problem", "Reverse", "Segment", "State", "Truncated", "TruncatedOptions",
           "UnrollResult", "conjugate_gradient", "detach", "es", "forward", "forward_online", "implicit", "make",
           "neumann", "pes", "register", "reverse", "segments", "truncated", "unroll"]
