"""The one place where neds-rt touches liblsl's configuration.

liblsl reads its configuration once, on first use, from the file named by ``LSLAPICFG``. Every module
that needs pylsl calls :func:`pylsl` (never ``import pylsl`` directly), so the configured scope is in force
before the first LSL call. ``machine`` scope keeps discovery on this host: ResolveScope = machine,
ListenAddress = 127.0.0.1 and IPv6 disabled, so no discovery packet leaves the machine.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Final, Literal

from neds_rt.errors import ConfigError, invalid

log = logging.getLogger(__name__)

Scope = Literal["machine", "link", "site"]
SCOPES: Final = ("machine", "link", "site")

_CONFIG: Final = {
    "machine": "[ports]\nIPv6 = disable\n\n[multicast]\nResolveScope = machine\nListenAddress = 127.0.0.1\n",
    "link": "[ports]\nIPv6 = disable\n\n[multicast]\nResolveScope = link\n",
    "site": "[multicast]\nResolveScope = site\n",
}

_applied: str | None = None


def config_text(scope: str) -> str:
    """The lsl_api.cfg content for ``scope``."""
    if scope not in _CONFIG:
        raise invalid("--lsl-scope", f"must be one of {', '.join(SCOPES)}", scope, "use machine for one host")
    return _CONFIG[scope]


def configure(scope: str = "machine") -> Path:
    """Write the config for ``scope`` and point ``LSLAPICFG`` at it; call before the first LSL call.

    liblsl reads its config once per process, so a second call with another scope after pylsl was
    loaded raises :class:`ConfigError` instead of silently keeping the old scope.
    """
    global _applied
    text = config_text(scope)
    if _applied is not None and _applied != scope and "pylsl" in sys.modules:
        raise invalid(
            "--lsl-scope", "cannot change after liblsl has been loaded in this process",
            f"{_applied} -> {scope}", "start a new process with the scope you want", kind=ConfigError,
        )
    path = Path(tempfile.gettempdir()) / f"neds_rt_lsl_{scope}_{os.getuid()}.cfg"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    os.environ["LSLAPICFG"] = str(path)
    _applied = scope
    log.debug("LSL scope %s via %s", scope, path)
    return path


def pylsl() -> ModuleType:
    """Return the pylsl module with a scope in force (machine scope unless :func:`configure` said else)."""
    if _applied is None:
        configure(os.environ.get("NEDS_RT_LSL_SCOPE", "machine"))
    import pylsl as _pylsl

    return _pylsl
