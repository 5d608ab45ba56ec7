"""Token-selection policies: IceCache and the baselines it is measured against, one file each."""

from .base import SelectionPolicy
from .icecache import IceCachePolicy
from .oracle import OraclePagePolicy, OraclePositionalPolicy, OracleTokenPolicy
from .quest import QuestPolicy
from .streaming import StreamingPolicy

POLICIES = {
    p.name: p
    for p in (IceCachePolicy, OracleTokenPolicy, OraclePagePolicy, OraclePositionalPolicy, QuestPolicy, StreamingPolicy)
}

__all__ = ["SelectionPolicy", "POLICIES", "IceCachePolicy", "OracleTokenPolicy", "OraclePagePolicy",
           "OraclePositionalPolicy", "QuestPolicy", "StreamingPolicy"]

from .sink_window import SinkWindowPolicy, default_sink_window  # noqa: E402

__all__ += ["SinkWindowPolicy", "default_sink_window"]
