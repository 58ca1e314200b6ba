"""The digits demo: ``python -m dynconv.train`` trains DynamicCNN and a static twin on
scikit-learn's handwritten digits (``data``), in one or several processes (``dist``), with the
training loop (``loop``), the models (``models``) and the written report (``report``)."""

from .cli import main

__all__ = ["main"]
