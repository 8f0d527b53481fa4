"""Topic administration: create the topics the service needs, leaving existing ones alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code


async def ensure_topics(
    bootstrap_servers: str,
    topic_names: Iterable[str],
    partitions: int,
    replication: int,
    *,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the missing topics and wait until the cluster's metadata shows them; return those created.

    A topic that already exists is kept as it is, whatever its partition count: repartitioning would
    move subjects between partitions and break their order.
    """
    wanted = list(dict.fromkeys(topic_names))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if not missing:
            return []
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication) for name in missing], timeout_ms=int(timeout_s * 1000)
        )
        created: list[str] = []
        for topic_error in response.topic_errors:
            name, code = topic_error[0], topic_error[1]
            if code == 0:
                created.append(name)
            elif code != TopicAlreadyExistsError.errno:  # another instance may have won the race
                error_class = for_code(code)
                detail = topic_error[2] if len(topic_error) > 2 and topic_error[2] else error_class.__name__
                raise error_class(f"cannot create topic {name!r}: {detail}")
        await _wait_until_listed(admin, missing, timeout_s)
        return created
    finally:
        await admin.close()


async def _wait_until_listed(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    # Real Kafka creates topics asynchronously; a producer started right away could see them missing.
    deadline = time.monotonic() + timeout_s
    while True:
        absent = set(names) - set(await admin.list_topics())
        if not absent:
            return
        if time.monotonic() > deadline:
            raise KafkaError(f"topics {sorted(absent)} still missing from metadata after {timeout_s:.0f}s")
        await asyncio.sleep(0.1)
