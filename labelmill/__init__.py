"""labelmill: a streaming pseudo-label data engine for CLIP-family teachers."""

__version__ = "0.1.0"
