"""Kept for imports written before the split (issue 17): the daemon is :mod:`fedquic.server.daemon`."""

from ..common.errors import JobError
from .daemon import AggregationServer
from .job import ClientRecord, JobResult

__all__ = ["AggregationServer", "ClientRecord", "JobError", "JobResult"]
