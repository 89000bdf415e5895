"""Offline, torch-only: trial alignment and windows, the NEDS model, masking, training, export."""
