"""Failures of the cluster, as opposed to a caller's mistakes (which are ValueErrors)."""
from __future__ import annotations


class ClusterError(RuntimeError):
    """Base for gang failures: the gang is unusable and must be replaced, never repaired."""


class PlacementError(ClusterError):
    """The gang's bundles cannot be placed."""


class PlacementTimeoutError(PlacementError):
    """The cluster did not have room for the gang's bundles in time."""


class PlacementImpossibleError(PlacementError):
    """The cluster's nodes could not hold the gang's bundles even if they were empty."""


class RankFailedError(ClusterError):
    """A rank actor died, hung, or failed while running a collective step."""


class GangStartError(ClusterError):
    """The gang did not start: a stage passed its deadline, or a rank failed while starting."""


class GangStartingError(ClusterError):
    """The gang is still starting (not a failure): retry later. `progress` says where it is."""

    def __init__(self, message: str, progress: dict):
        super().__init__(message)
        self.progress = progress


class OverloadedError(Exception):
    """The replica already holds as many requests as it may (running and waiting): come back
    later. Not a failure of the gang, and not the caller's mistake."""


class DrainingError(Exception):
    """Serve is stopping this replica (a shutdown, a redeploy, a scale-down): it takes no new
    requests and ends those it has not started, and, once its grace period is spent, those still
    running. Not a failure of the gang, and not the caller's mistake: the client should retry,
    and another replica (or this one's replacement) will serve it."""
