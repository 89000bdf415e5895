"""Where data comes from: IBL sessions through ONE-api, the IBL-like simulator, and live replay."""

from streams.session import Session

__all__ = ["Session"]
