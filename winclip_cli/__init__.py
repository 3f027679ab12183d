"""winclip: zero-/few-shot visual anomaly classification and segmentation with WinCLIP."""

__version__ = "0.1.0"
