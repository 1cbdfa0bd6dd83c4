"""Open-world capture: signature binding, concrete-metadata tracing with guards, automatic leaves and
structured outputs (see ``leaves.capture``)."""
from .guards import GuardError
from .leaves import CaptureInfo, LeafNote, capture, capture_info
from .signature import bind_inputs, plain_signature

__all__ = ["GuardError", "CaptureInfo", "LeafNote", "capture", "capture_info", "bind_inputs",
           "plain_signature"]
