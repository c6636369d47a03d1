"""The one Settings object: defaults, then a YAML file, then STROKEGATE_* environment, then CLI.

This is the only module that reads the environment; everything else receives its settings as
arguments.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from service.findings import ResultCategory

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def check_ae_title(value: str) -> str:
    """An AE title: 1-16 printable characters, no backslash, not all spaces."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"not a valid AE title (1-16 printable characters, no backslash): {value!r}")
    return value.strip()


RESULT_CATEGORIES = tuple(ResultCategory)
"""What a destination can be sent, all by default."""


class SeriesLabel(BaseModel):
    """How a destination wants one category of result series numbered and described; an unset
    field keeps StrokeGate's own. For "maps" and "values", which hold one series per map, the number
    is the first map's (CBF) and each map keeps its place after it (CBV +1, MTT +2, TTP +3, Tmax +4,
    ADC +5); the description gets the map's name appended, or put where it says ``{map}``, and
    " (RESEARCH)" unless it says "research" already."""

    model_config = ConfigDict(extra="forbid")

    number: int | None = Field(None, ge=1, le=99999)
    description: str | None = Field(None, min_length=1, max_length=48)  # + map name + mark <= 64


class DicomTransport(str, enum.Enum):
    """What the DICOM port speaks."""

    PLAIN = "plain"  # unencrypted DICOM only
    TLS = "tls"  # DICOM TLS only: a plain association request is rejected
    BOTH = "both"  # either, told apart by the first byte the peer sends (while senders move to TLS)


class JobQueueKind(str, enum.Enum):
    """Where analysis jobs wait and who takes them."""

    DATABASE = "database"  # worker threads of `strokegate serve` claim them from the database (embedded)
    CELERY = "celery"  # `serve` publishes them to RabbitMQ; `strokegate worker` processes run them


class ConfirmMode(str, enum.Enum):
    """How the sender settles an *uncertain* object (sent, its response never recorded: the service
    died or the association broke between the last byte and the response)."""

    NONE = "none"  # send it again: at least once (a PACS keeping one copy per SOP Instance UID ends with one)
    FIND = "find"  # ask first, by C-FIND at IMAGE level (Study Root); held: delivered, not sent again


class Destination(BaseModel):
    """A DICOM node results are sent to by C-STORE, which of the results it gets and how their
    series are labelled there."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    send: list[ResultCategory] = Field(default_factory=lambda: list(RESULT_CATEGORIES), min_length=1)
    series: dict[ResultCategory, SeriesLabel] = Field(default_factory=dict)
    tls: bool = Field(False, description="send over DICOM TLS (our tls_certificate is presented when the node asks)")
    tls_ca: Path | None = Field(None, description="PEM CA file the node's certificate must chain to; default: tls_ca, "
                                "else the system's trusted CAs")
    tls_check_hostname: bool = Field(True, description="the node's certificate must name its host (DNS name or IP)")
    confirm: ConfirmMode = Field(ConfirmMode.NONE, description="before resending an uncertain object: none (resend), "
                                 "find (C-FIND the node for it; a failed query resends)")
    confirm_timeout_s: float = Field(10.0, gt=0, le=300, description="bound of the whole confirmation query")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("send", "series", mode="before")
    @classmethod
    def _categories(cls, values: Any, info: ValidationInfo) -> Any:
        unknown = sorted(set(values) - set(RESULT_CATEGORIES)) if isinstance(values, list | dict) else []
        if unknown:
            raise ValueError(f"{info.field_name}: no result category {unknown}; choose from {', '.join(RESULT_CATEGORIES)}")
        return values

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@host:port``, e.g. ``PACS@10.0.0.5:104``, optionally ``?send=seg+sr+summary`` and
        ``&tls`` (or ``?tls``): DICOM TLS, ``&confirm=find``: ask before resending an uncertain object."""
        match = re.fullmatch(r"(?P<ae>[^@]+)@(?P<host>[^:@?]+):(?P<port>\d+)(\?(?P<query>[a-z+=&]+))?", text.strip())
        options = dict(item.partition("=")[::2] for item in match["query"].split("&")) if match and match["query"] else {}
        if not match or set(options) - {"send", "tls", "confirm"} or options.get("tls", "on") not in ("", "on", "off") \
                or options.get("send") == "" or options.get("confirm", "none") not in {m.value for m in ConfirmMode}:
            raise ValueError(f"destination must look like AE@host:port[?send=seg+sr+...][&tls][&confirm=none|find], got {text!r}")
        send = options["send"].split("+") if options.get("send") else list(RESULT_CATEGORIES)
        return cls(ae_title=match["ae"], host=match["host"], port=int(match["port"]), send=send,
                   tls=options.get("tls", "off") != "off", confirm=ConfirmMode(options.get("confirm", "none")))

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Settings(BaseSettings):
    """Every setting of the service, with its default. See README, "Configuration"."""

    model_config = SettingsConfigDict(env_prefix="STROKEGATE_", env_nested_delimiter="__", extra="forbid")

    # DICOM receiver
    ae_title: str = "STROKEGATE"
    host: str = Field("127.0.0.1", description="loopback by default: set the address the PACS reaches (0.0.0.0: all)")
    port: int = Field(11112, ge=0, le=65535)
    max_pdu: int = Field(4 * 1024 * 1024, ge=0, description="largest PDU we accept, bytes; 0 = unlimited")
    max_associations: int = Field(16, ge=1)
    allowed_calling_aets: list[str] = Field(default_factory=list, description="empty: any calling AE")
    allowed_hosts: list[str] = Field(default_factory=list, description="empty: any peer address")
    network_timeout_s: float = Field(60.0, gt=0)
    dicom_transport: DicomTransport = DicomTransport.PLAIN
    tls_certificate: Path | None = Field(None, description="PEM certificate (chain) of this node, for DICOM TLS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_certificate (unencrypted, owner-only)")
    tls_ca: Path | None = Field(None, description="PEM CA certificates that issued the peers' certificates")
    tls_require_client_certificate: bool = Field(
        True, description="DICOM TLS senders must present a certificate issued by tls_ca"
    )
    max_connections: int = Field(
        64, ge=1, description="open DICOM connections, associated or not; one host may hold at most half"
    )
    max_associations_per_host: int | None = Field(
        None, ge=1, description="associations one peer address may hold; unset: half of max_associations"
    )
    association_request_timeout_s: float = Field(
        10.0, gt=0, description="ARTIM: the whole A-ASSOCIATE-RQ must arrive within this after the connection"
    )
    max_instance_bytes: int = Field(
        2 * 1024**3, ge=0, description="longest dataset of one C-STORE; a longer one aborts the association; 0 = unlimited"
    )

    # Storage
    database_url: str = "sqlite:///strokegate.db"
    spool_dir: Path = Path("spool")
    results_dir: Path = Path("results")
    min_free_bytes: int = Field(2 * 1024**3, ge=0, description="refuse new instances below this free space")
    receive_sync: bool = Field(
        True,
        description="sync each instance to disk before answering Success; false: synced within "
        "receive_sync_interval_s (a crash of the service loses nothing, a power cut may lose that last interval)",
    )
    receive_sync_interval_s: float = Field(0.01, gt=0, le=1)
    retention_hours: float = Field(24.0, ge=0, description="delete spooled images of finished studies after this")

    # Study completion and jobs
    series_idle_s: float = Field(15.0, gt=0, description="a series is complete this long after its last instance")
    workers: int = Field(1, ge=1, description="analysis threads of serve (job_queue database) or of each `strokegate worker`")
    job_queue: JobQueueKind = Field(
        JobQueueKind.DATABASE, description="database: serve analyses in its own threads; celery: `strokegate worker` "
        "processes on other machines do, taking the jobs from broker_url"
    )
    broker_url: str = Field("amqp://guest:guest@127.0.0.1:5672//", description="RabbitMQ for job_queue celery")
    celery_queue: str = Field(
        "strokegate-analysis", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$",
        description="the RabbitMQ queue of the analysis tasks; serve and its workers name the same",
    )
    job_lease_s: float = Field(300.0, gt=0, description="a job whose worker is silent this long is retried")
    job_max_attempts: int = Field(3, ge=1)

    # Analysis
    adc_core_threshold: float = Field(620.0, gt=0, description="core: ADC below this, 1e-6 mm2/s")
    min_lesion_ml: float = Field(0.3, ge=0, description="connected core components smaller than this are removed")
    core_rcbf_threshold: float = Field(
        0.30, gt=0, lt=1, description="CT perfusion core: CBF below this fraction of contralateral normal tissue"
    )
    tmax_threshold_s: float = Field(
        6.0, gt=0, lt=10, description="hypoperfused: Tmax above this, s (below the 10 s of the HIR numerator)"
    )
    vessel_cbv_threshold: float = Field(
        8.0, gt=0, description="CT perfusion: voxels with CBV above this, mL/100 g, are vessels and left out"
    )
    ctp_anatomy_detail: bool = Field(
        True, description="CT perfusion: grey/white matter detail of CBF and CBV from the temporal mean image"
    )
    target_max_core_ml: float = Field(70.0, gt=0, description="DEFUSE 3 target mismatch: core below this, mL")
    target_min_mismatch_ratio: float = Field(
        1.8, gt=0, description="DEFUSE 3 target mismatch: hypoperfused / core at least this"
    )
    target_min_mismatch_ml: float = Field(
        15.0, ge=0, description="DEFUSE 3 target mismatch: hypoperfused - core at least this, mL"
    )

    # Learned models
    inference_backend: Literal["auto", "tensorrt", "onnxruntime", "torch"] = Field(
        "auto", description="engine for the learned models; auto: TensorRT where it runs, else ONNX Runtime (the choice is logged)"
    )
    models_dir: Path = Field(
        Path(__file__).resolve().parent.parent / "models" / "weights",
        description="folder of the model files (.onnx) and their cards (.card.json)",
    )
    engine_cache_dir: Path = Field(Path("engines"), description="TensorRT engines built from the ONNX files, cached per GPU")
    learned_models: bool = Field(
        True, description="run the learned models beside the threshold methods (their segments are added to the results)"
    )
    ctp_core_method: Literal["threshold", "model"] = Field(
        "threshold", description="CT perfusion: whose core and penumbra the volumes and verdict use; threshold is the clinical standard"
    )

    # Delivery
    destinations: list[Destination] = Field(default_factory=list)
    delivery_backoff_s: float = Field(2.0, gt=0, description="first retry delay; doubles up to the maximum")
    delivery_backoff_max_s: float = Field(300.0, gt=0)

    # Clinical data (NIHSS from the EHR)
    hl7_port: int | None = Field(
        None, ge=0, le=65535, description="HL7 v2 MLLP listener for ORU^R01 with the NIHSS; unset: no listener (0: any free port)"
    )
    hl7_host: str = Field("127.0.0.1", description="address the HL7 listener binds (loopback by default)")
    hl7_max_message_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="longest MLLP frame accepted")
    hl7_max_connections: int = Field(16, ge=1, description="open HL7 connections at once")
    fhir_base_url: str | None = Field(None, description="FHIR R4 base URL searched for each study's NIHSS; unset: no search")
    fhir_search_for_s: float = Field(
        6 * 3600.0, gt=0, description="keep searching the FHIR server for a study's NIHSS this long after it arrived"
    )
    fhir_poll_s: float = Field(30.0, gt=0, description="time between two FHIR searches for the same patient")
    fhir_timeout_s: float = Field(10.0, gt=0, description="a FHIR request gives up after this")
    fhir_token_url: str | None = Field(
        None, description="SMART Backend Services: the EHR's OAuth2 token endpoint; unset: FHIR searches carry no token"
    )
    fhir_client_id: str | None = Field(None, description="SMART: StrokeGate's client id at the EHR")
    fhir_private_key: Path | None = Field(
        None, description="SMART: PEM RSA private key signing the RS384 client assertion (the EHR holds its public key)"
    )
    fhir_key_id: str | None = Field(None, description="SMART: the key's id (JWK kid) at the EHR")
    fhir_client_secret: SecretStr | None = Field(None, description="SMART: a client secret instead of a private key")
    fhir_scope: str = Field("system/Observation.read", description="SMART: the scope asked for")

    # Operations
    http_host: str = Field("127.0.0.1", description="loopback by default; set it for a Prometheus on another host")
    http_port: int = Field(8080, ge=0, le=65535)
    worker_metrics_port: int = Field(
        0, ge=0, le=65535,
        description="`strokegate worker`: serve its Prometheus metrics (jobs, stages, inference) at http_host on this "
        "port, /metrics, without a token (counts and durations only); 0: none",
    )
    http_tls_certificate: Path | None = Field(None, description="PEM certificate (chain): the API is served as HTTPS")
    http_tls_key: Path | None = Field(None, description="PEM private key of http_tls_certificate")
    api_auth: bool = Field(True, description="/api needs a bearer token (strokegate token create)")
    metrics_auth: bool = Field(True, description="/metrics needs a bearer token too (false: open to any scraper)")
    api_docs: bool = Field(False, description="serve /docs and /openapi.json (the API's shape, no data; unauthenticated)")
    log_level: str = "INFO"
    log_tag_key: str | None = Field(
        None, description="key of the tags that stand for UIDs in logs; default: one made at first start, kept in the spool"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aes(cls, values: list[str]) -> list[str]:
        return [check_ae_title(v) for v in values]

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if self.dicom_transport != DicomTransport.PLAIN:
            if self.tls_certificate is None or self.tls_key is None:
                raise ValueError(f"dicom_transport {self.dicom_transport.value} needs tls_certificate and tls_key")
            if self.tls_require_client_certificate and self.tls_ca is None:
                raise ValueError("tls_require_client_certificate needs tls_ca (the CA that issued the senders' "
                                 "certificates); or set tls_require_client_certificate to false")
        if self.hl7_port and self.hl7_port in (self.port, self.http_port) and self.hl7_host in (self.host, self.http_host):
            raise ValueError(f"hl7_port {self.hl7_port} is also the DICOM or HTTP port: give the HL7 listener its own port")
        if self.fhir_base_url is not None and not self.fhir_base_url.startswith(("http://", "https://")):
            raise ValueError(f"fhir_base_url {self.fhir_base_url!r} must be an http:// or https:// URL")
        if self.fhir_token_url is not None:
            if not self.fhir_token_url.startswith(("http://", "https://")):
                raise ValueError(f"fhir_token_url {self.fhir_token_url!r} must be an http:// or https:// URL")
            if not self.fhir_client_id:
                raise ValueError("fhir_token_url needs fhir_client_id (StrokeGate's client id at the EHR)")
            if (self.fhir_private_key is None) == (self.fhir_client_secret is None):
                raise ValueError("fhir_token_url needs exactly one of fhir_private_key (RS384 client assertion) "
                                 "or fhir_client_secret")
        elif self.fhir_client_id or self.fhir_private_key or self.fhir_client_secret:
            raise ValueError("fhir_client_id, fhir_private_key and fhir_client_secret need fhir_token_url")
        if self.port and self.port == self.http_port:
            raise ValueError(f"port and http_port are both {self.port}: give the DICOM and HTTP servers a port each")
        if (self.http_tls_certificate is None) != (self.http_tls_key is None):
            raise ValueError("HTTPS needs both http_tls_certificate and http_tls_key")
        return self

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, values: Any) -> Any:
        if isinstance(values, str):
            values = [v for v in values.split(",") if v.strip()]
        return [Destination.parse(v) if isinstance(v, str) else v for v in values]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


def setting_default(name: str) -> Any:
    """The default of one Settings field, for the analysis code's own defaults (thresholds such as
    the core rCBF), so that each is written once, here."""
    return Settings.model_fields[name].default


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``config_file`` (YAML), the environment and ``overrides`` (highest first:
    overrides, environment, file, defaults). ``None`` overrides are ignored."""
    cls = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"configuration file not found: {config_file}")
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": config_file}})
    return cls(**{k: v for k, v in overrides.items() if v is not None})
