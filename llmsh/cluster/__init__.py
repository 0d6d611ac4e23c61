"""llmsh.cluster: processes on several machines. `placement` (the pure policy) needs nothing; `ray_engines` (the
front's side) and `ray_actor` (the engine as a Ray actor) need the optional extra `llmsh[ray]`."""

from llmsh.config import ConfigError


class ClusterError(ConfigError):
    """The kernel cannot join or use the cluster it was asked for (one line saying what to do)."""
