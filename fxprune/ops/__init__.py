"""Op rules, one module per op family. Importing this package registers them all."""
from . import concat, conv, elementwise, io, linear, norm, reshape, split  # noqa: F401  (registration)
from . import attention, attention_mha  # noqa: F401  (registration: sdpa, matmul, head reshapes, MHA)
from . import maxvit, window_attention  # noqa: F401  (registration: torchvision MaxViT and Swin attention)
from . import guard  # noqa: F401  (registration: fxprune.capture input guards)
from .registry import OpRule, lookup, module_rule, register_functions, register_op

norm.register_torchvision()
elementwise.register_torchvision()

__all__ = ["OpRule", "lookup", "module_rule", "register_op", "register_functions"]
