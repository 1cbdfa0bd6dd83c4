"""The core vocabulary every layer speaks; it imports nothing else from fxprune.

* ``space``: ``Space`` (one dim of one tensor or parameter axis) and ``Port`` (a tensor with its shape);
* ``spec``: ``TensorSpec`` / ``spec_of``, the shapes recorded on traced nodes;
* ``coupling``: ``Coupling`` and ``Tie``, what an op rule states about one node;
* ``context``: ``SizeContext`` / ``RewriteContext``, the shrunk sizes rules count and rewrite with.
"""
from .context import RewriteContext, SizeContext
from .coupling import Coupling, Tie, make_tie
from .space import Port, Space, arange
from .spec import META, TensorSpec, spec_of

__all__ = ["Coupling", "META", "Port", "RewriteContext", "SizeContext", "Space", "TensorSpec", "Tie", "arange",
           "make_tie", "spec_of"]
