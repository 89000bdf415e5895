"""Where data comes from: IBL sessions through ONE-api, the IBL-like simulator, and live replay."""

from streams.load import list_probes, load_session, open_one
from streams.one_cache import write_one_cache
from streams.session import Session
from streams.sim_files import SessionFiles

__all__ = ["Session", "SessionFiles", "list_probes", "load_session", "open_one", "write_one_cache"]
