"""Questions asked from the command line: the same service the HTTP API uses, on a short-lived pool."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from consent_ledger.adapters.policy_files import load_timeline
from consent_ledger.adapters.postgres.connection import create_pool
from consent_ledger.apps.audit_api.service import EligibilityService, Question
from consent_ledger.config import Settings


async def ask_one(
    settings: Settings, subject_id: str, conversation_id: str, at: datetime | None, known_at: datetime | None
) -> dict[str, Any]:
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        service = EligibilityService(
            pool, load_timeline(settings.policy_file), app_id=settings.processor_group_id,
            partitions=settings.topic_partitions, state_wait_seconds=settings.state_wait_seconds,
        )
        answers = await service.decide([Question(subject_id, conversation_id)], at, known_at)
        return answers[0]
    finally:
        await pool.close()
