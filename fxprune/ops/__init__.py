"""Op rules, one module per op family. Importing this package registers them all."""
from . import (  # noqa: F401  (importing a rule module registers its rules)
    attention,
    attention_mha,
    concat,
    conv,
    elementwise,
    gmlp,
    guard,
    io,
    linear,
    maxvit,
    norm,
    reshape,
    split,
    std_conv,
    window_attention,
)
from .registry import OpRule, lookup, module_rule, register_functions, register_op

norm.register_torchvision()
elementwise.register_torchvision()

__all__ = ["OpRule", "lookup", "module_rule", "register_op", "register_functions"]
