"""Failures of the cluster, as opposed to a caller's mistakes (which are ValueErrors)."""
from __future__ import annotations


class ClusterError(RuntimeError):
    """Base for gang failures: the gang is unusable and must be replaced, never repaired."""


class PlacementTimeoutError(ClusterError):
    """The cluster did not have room for the gang's bundles in time."""


class RankFailedError(ClusterError):
    """A rank actor died, hung, or failed while running a collective step."""
