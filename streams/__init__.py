"""Where data comes from: IBL sessions through ONE-api, the IBL-like simulator, and live replay."""

from streams.load import list_probes, load_session, open_one
from streams.one_cache import write_one_cache
from streams.replay import ReplayClock, ReplayConfig, Replayer, ReplaySummary, replay_clock_from_info
from streams.session import Session
from streams.sim_files import SessionFiles

__all__ = [
    "ReplayClock",
    "ReplayConfig",
    "ReplaySummary",
    "Replayer",
    "Session",
    "SessionFiles",
    "list_probes",
    "load_session",
    "open_one",
    "replay_clock_from_info",
    "write_one_cache",
]
