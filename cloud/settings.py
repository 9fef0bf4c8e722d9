"""The cloud's settings (DESIGN §5): one object, read from `DIREDI_*` environment variables or `.env`."""

import ipaddress
from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every deployable of the cloud (API, ingest, worker, CLI) reads this one object."""

    model_config = SettingsConfigDict(env_prefix="DIREDI_", env_file=".env", extra="ignore")

    data_dir: Path = Path(".diredi")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite at <data_dir>/registry.db"
    )
    artifact_dir: Path | None = Field(
        None, description="content-addressed artifacts; default <data_dir>/artifacts"
    )
    signing_key_dir: Path | None = Field(
        None, description="the cloud's Ed25519 keys; default <data_dir>/keys (owner-only)"
    )
    fleet_ca_dir: Path | None = Field(
        None,
        description="the fleet CA that certifies devices' keys (made on first use, owner-only); "
        "default <signing key dir>/ca",
    )
    front_secret: SecretStr | None = Field(
        None,
        description="shared with the nginx front (`diredi front render --device-ca`): the front sends it "
        "with the device certificate it verified, and only then does the API take that certificate as "
        "the device's credentials (downloads of certificate devices)",
    )
    claim_ca_dir: Path | None = Field(
        None,
        description="the CA of claim certificates (`diredi claims issue`), which may only enrol devices; "
        "default <signing key dir>/claim-ca",
    )
    broker_pid_file: Path | None = Field(
        None,
        description="mosquitto's pid file: the cloud sends it SIGHUP to reload the CRL after a "
        "certificate device is revoked (unset: reloading is the deployment's)",
    )
    mqtt_url: SecretStr = Field(
        SecretStr("mqtt://127.0.0.1:1883"),
        description="the broker, as the cloud's service account: mqtt[s]://user:password@host:port"
        "[?protocol=3.1.1]",
    )
    mqtt_admin_url: SecretStr | None = Field(
        None,
        description="the broker's dynamic-security admin account; when set, the API registers and "
        "removes device credentials in the running broker",
    )
    mqtt_ca_file: Path | None = Field(None, description="CA bundle that signed the broker's TLS certificate")
    mqtt_client_id: str | None = Field(
        None,
        pattern=r"^diredi-[A-Za-z0-9_-]{1,57}$",
        description="the client id this process connects with: the name of its own service account, which "
        "the broker binds to it (`diredi broker account`); default: diredi-ingest-NAME for an ingest, "
        "a random diredi-publisher-... for a worker (an account not bound to a client id)",
    )
    ingest_group: str = Field(
        "diredi-ingest",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="MQTT 5 shared-subscription group: ingests in one group split the messages",
    )
    ingest_batch_size: int = Field(1000, ge=1, le=100_000, description="messages per ingest commit, at most")
    ingest_batch_bytes: int = Field(
        8 << 20,
        ge=1 << 16,
        le=1 << 30,
        description="payload bytes per ingest commit, at most (one message always fits)",
    )
    ingest_batch_ms: float = Field(
        50.0, gt=0, le=10_000, description="the longest a received message waits for its commit"
    )
    ingest_metrics_port: int = Field(9102, ge=0, le=65535, description="Prometheus metrics (0: none)")
    metrics_host: str = Field(
        "127.0.0.1",
        description="the IP address the ingest's and the worker's Prometheus metrics listen on; 0.0.0.0 "
        "(or ::) lets a Prometheus on another host scrape them (docs/monitoring.md)",
    )
    redis_url: str | None = Field(
        None,
        pattern=r"^rediss?://",
        description="Celery's broker (redis://host:port/db); default: the embedded queue, an SQLite file "
        "in the data directory (kombu's SQLAlchemy transport), for one machine",
    )
    job_lease_seconds: float = Field(
        60.0,
        ge=5,
        le=3600,
        description="a running job's lease; a job whose worker died is run again once its lease has run out",
    )
    pipeline_min_reports: int = Field(
        1, ge=1, le=10_000, description="received knowledge reports of a cohort that start a pipeline job"
    )
    pipeline_max_wait_s: float = Field(
        3600.0,
        gt=0,
        description="fewer reports than pipeline_min_reports start a job once the oldest "
        "has waited this long",
    )
    worker_metrics_port: int = Field(9103, ge=0, le=65535, description="Prometheus metrics (0: none)")
    worker_torch_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="threads a worker's training uses; the nets are small, and on a machine shared with "
        "the API, the ingest and other trainings more threads wait on each other "
        "(docs/pipeline-benchmarks.md)",
    )
    rd_recipes: str = Field(
        "relabel,re-KD,relabel+re-KD",
        pattern=r"^[A-Za-z0-9+ -]{1,40}(,[A-Za-z0-9+ -]{1,40}){0,15}$",
        description="the RD cycle's candidate recipes, tried in order until one passes "
        "(docs/learning-loop.md): relabel, re-KD, relabel+re-KD, plain re-KD, longer, head",
    )
    pipeline_auto_rollout: bool = Field(True, description="an approved model starts a rollout to its cohort")
    telemetry_retention_days: float = Field(7.0, gt=0, description="telemetry older than this is pruned")
    api_tune_gc: bool = Field(True, description="freeze start-up objects and collect garbage less often")
    api_db_connections: int = Field(
        32, ge=1, le=500, description="database connections each API process keeps open for reads"
    )
    api_key_cache_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="how long an API process trusts a key it has checked (0: check every request); "
        "a key revoked through another process keeps working in this one for at most this long",
    )
    api_max_body_bytes: int = Field(1 << 20, gt=0, description="requests with a larger body get 413")
    api_auth_failure_burst: int = Field(
        20,
        ge=1,
        le=10_000,
        description="failed authentications one source address may make within the window; after that "
        "it gets 429 without its credentials being checked (counted per API process)",
    )
    api_auth_failure_window_seconds: float = Field(
        60.0, gt=0, le=86_400, description="the sliding window over which failed authentications are counted"
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("sqlite", "postgresql")):
            raise ValueError("database_url must be a sqlite:// or postgresql:// URL")
        return url

    @field_validator("metrics_host")
    @classmethod
    def _ip_address(cls, host: str) -> str:
        # An address, not a name: what the metrics are exposed on should not depend on DNS at start-up.
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"metrics_host must be an IPv4 or IPv6 address, not {host!r}") from None

    @cached_property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to an SQLite file under the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    @cached_property
    def resolved_queue_url(self) -> str:
        """Celery's broker: Redis when configured, else the embedded queue in the data directory."""
        if self.redis_url:
            return self.redis_url
        return f"sqla+sqlite:///{(self.data_dir / 'queue.db').resolve()}"

    @cached_property
    def resolved_artifact_dir(self) -> Path:
        """Where the local artifact store keeps blobs."""
        return self.artifact_dir or self.data_dir / "artifacts"

    @cached_property
    def resolved_signing_key_dir(self) -> Path:
        """Where the cloud's signing keys live."""
        return self.signing_key_dir or self.data_dir / "keys"

    @cached_property
    def resolved_claim_ca_dir(self) -> Path:
        """Where the claim CA lives."""
        return self.claim_ca_dir or self.resolved_signing_key_dir / "claim-ca"

    @cached_property
    def resolved_fleet_ca_dir(self) -> Path:
        """Where the fleet CA lives."""
        return self.fleet_ca_dir or self.resolved_signing_key_dir / "ca"
