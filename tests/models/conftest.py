"""Ultralytics kept offline and out of the user's settings: set before any test module imports it.

``YOLO_OFFLINE`` makes ``ultralytics.utils.is_online()`` false (no connectivity checks, no downloads),
``YOLO_AUTOINSTALL=False`` keeps it from pip-installing a missing requirement (ONNX export checks some) and
``YOLO_CONFIG_DIR`` puts the settings file Ultralytics writes on import in a temporary directory.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install a missing export requirement
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="fxprune-ultralytics-"))
