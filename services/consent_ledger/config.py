"""The one settings object, read from CONSENT_LEDGER_* environment variables by the entry points only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ROLES = ("auditor", "pipeline", "admin")


class Settings(BaseSettings):
    """Where the servers are and how the services behave; unset servers mean "start embedded ones"."""

    model_config = SettingsConfigDict(env_prefix="CONSENT_LEDGER_", frozen=True, extra="forbid")

    kafka_bootstrap_servers: str | None = Field(
        None, description="host:port[,host:port]; unset starts the embedded Tansu broker"
    )
    database_url: str | None = Field(
        None, description="postgresql:// URL of the service role; unset starts embedded PostgreSQL"
    )
    admin_database_url: str | None = Field(
        None, description="postgresql:// URL allowed to run migrations; defaults to database_url"
    )
    topic_prefix: str = Field("", description="prefix for every topic name, to share one Kafka cluster")
    topic_partitions: int = Field(4, ge=1, description="partitions of each topic the service creates")
    topic_replication: int = Field(1, ge=1, description="replication factor of topics the service creates")
    writer_group: str = Field("consent-ledger-writer", description="consumer group of the ledger writers")
    processor_app_id: str = Field("consent-ledger-processor", description="faust app id of the processors")
    processor_session_timeout_seconds: float = Field(
        60.0, gt=0, description="a silent processor worker leaves the group (its partitions move) after this long"
    )
    processor_cache_subjects: int = Field(
        10_000, ge=0, description="subjects whose folded history a processor worker keeps in memory (~1.2 KB an entry)"
    )
    processor_batch_messages: int = Field(
        512, ge=1, description="most feed messages folded in one transaction (up to 1,000 entries each)"
    )
    writer_batch_max: int = Field(2000, ge=1, description="most records appended in one transaction")
    max_future_skew_seconds: float = Field(
        300.0, ge=0, description="how far occurred_at may lie ahead of the ledger clock"
    )
    max_message_bytes: int = Field(1_000_000, ge=1024, description="larger messages are rejected")
    api_host: str = Field("127.0.0.1", description="address the audit API listens on")
    api_port: int = Field(8080, ge=0, le=65535, description="port of the audit API; 0 picks a free one")
    auditor_tokens: SecretStr = Field(SecretStr(""), description="comma-separated bearer tokens, role auditor")
    pipeline_tokens: SecretStr = Field(SecretStr(""), description="comma-separated bearer tokens, role pipeline")
    admin_tokens: SecretStr = Field(SecretStr(""), description="comma-separated bearer tokens, role admin")
    batch_max_items: int = Field(10_000, ge=1, description="most items in one batch eligibility request")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="port of /metrics for the writer and processors; 0 disables it"
    )
    state_wait_seconds: float = Field(
        2.0, ge=0, description="how long a question waits for state to catch up before answering 503"
    )
    readiness_max_lag: int = Field(1000, ge=0, description="/readyz fails when state lags the ledger more")
    policy_file: Path | None = Field(None, description="policy timeline JSON; unset uses the shipped default")
    data_dir: Path = Field(Path(".consent-ledger"), description="where embedded PostgreSQL keeps its data")
    log_level: str = Field("info", description="debug, info, warning or error")

    def tokens_by_role(self) -> dict[str, str]:
        """Map each configured token to its role."""
        found: dict[str, str] = {}
        for role in ROLES:
            secret: SecretStr = getattr(self, f"{role}_tokens")
            for token in secret.get_secret_value().split(","):
                if token.strip():
                    found[token.strip()] = role
        return found

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def writer_group_id(self) -> str:
        """The writers' consumer group, scoped by the topic prefix like everything on the cluster."""
        return f"{self.topic_prefix}{self.writer_group}"

    @property
    def processor_group_id(self) -> str:
        """The faust app id (consumer group and changelog topic names), scoped by the topic prefix."""
        return f"{self.topic_prefix}{self.processor_app_id}"


@dataclass(frozen=True)
class Topics:
    """Topic names, all under one optional prefix."""

    prefix: str = ""

    def name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    @property
    def ledger_entries(self) -> str:
        return self.name("ledger.entries")

    @property
    def dead_letter(self) -> str:
        return self.name("consent.rejected")
