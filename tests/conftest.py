"""Test-wide set-up: LSL in machine scope before anything can load liblsl."""

from __future__ import annotations

from neds_rt import lsl_scope

lsl_scope.configure("machine")
