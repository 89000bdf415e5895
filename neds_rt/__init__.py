"""neds-rt: real-time closed-loop decoding with NEDS. The runtime never imports torch at module level."""

__version__ = "0.1.0"
