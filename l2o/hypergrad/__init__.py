"""One unroll, four hypergradient estimators: reverse, truncated, forward, implicit."""
from .forward import ForwardUnroll, forward, forward_online
from .implicit import conjugate_gradient, implicit, neumann
from .reverse import Segment, reverse, segments, truncated
from .unroll import UnrollResult, detach, unroll

__all__ = ["ForwardUnroll", "Segment", "UnrollResult", "conjugate_gradient", "detach", "forward", "forward_online",
           "implicit", "neumann", "reverse", "segments", "truncated", "unroll"]
