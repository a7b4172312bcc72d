"""Every knob and secret of lorabot, read from the environment and ./.env.

Names follow ../shared/cli-contract.md exactly (VASTAI_*, DISCORD_*, R2_*, HF_TOKEN, LORABOT_*).
Knobs that the contract does not name carry the LORABOT_ prefix. Secrets are SecretStr so that
their values never show up in reprs, logs or tracebacks; `secret_values()` lists them so that
outgoing text can be redacted.
"""

from __future__ import annotations

import enum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as _SourceError


class SettingsError(Exception):
    """A setting is missing or malformed. The message is one line and names the variable."""


class MissingCaptionPolicy(enum.StrEnum):
    FAIL = "fail"
    TRIGGER = "trigger"  # fill with the trigger word, as ai-toolkit itself would
    CAPTIONER = "captioner"  # hand over to a captioner (interface only for now)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
        # issue 17: `VAR=` (as in .env.example) means "not set": the default applies
        env_ignore_empty=True,
    )

    # --- Vast.ai -----------------------------------------------------------------------------
    # Vast.ai API key (secret)
    vastai_api_key: SecretStr | None = Field(None, validation_alias="VASTAI_API_KEY")
    # the Vast.ai API's base URL
    vastai_api_url: str = Field("https://console.vast.ai", validation_alias="VASTAI_API_URL")
    # private key the rented machines trust; its .pub beside it is registered with Vast.ai
    vastai_ssh_key_path: Path = Field(Path("~/.ssh/id_ed25519"), validation_alias="VASTAI_SSH_KEY_PATH")
    # seconds one Vast.ai API request may take
    vastai_timeout_s: float = Field(30.0, gt=0, validation_alias="LORABOT_VASTAI_TIMEOUT_S")
    # retries of a Vast.ai request answered 429 or 5xx
    vastai_max_retries: int = Field(6, ge=0, le=20, validation_alias="LORABOT_VASTAI_MAX_RETRIES")
    # base delay of the jittered exponential backoff on 429/5xx (tests shrink it)
    vastai_backoff_s: float = Field(1.0, ge=0, validation_alias="LORABOT_VASTAI_BACKOFF_S")
    # longest delay of that backoff
    vastai_backoff_max_s: float = Field(30.0, ge=0, validation_alias="LORABOT_VASTAI_BACKOFF_MAX_S")
    # minimum interval between two calls to the same endpoint (Vast.ai enforces per-endpoint pacing)
    vastai_min_interval_s: float = Field(0.25, ge=0, validation_alias="LORABOT_VASTAI_MIN_INTERVAL_S")
    # --- issue 14: the real Vast.ai -------------------------------------------------------------
    # a create has its own timeout (the official SDK's 120 s): Vast may take that long to rent
    vastai_create_timeout_s: float = Field(120.0, gt=0, validation_alias="LORABOT_VASTAI_CREATE_TIMEOUT_S")
    # after an unanswered create, the label is watched this long (create timeout + list lag) before
    # another offer is tried; then looked at again at these delays (s) to destroy a late second rental
    vastai_label_watch_s: float = Field(180.0, ge=0, validation_alias="LORABOT_VASTAI_LABEL_WATCH_S")
    vastai_label_rechecks_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [60.0, 180.0, 600.0], validation_alias="LORABOT_VASTAI_LABEL_RECHECKS_S"
    )
    # `actual_status: unknown` this long in a row means the machine will never run: rent elsewhere
    vastai_unknown_grace_s: float = Field(90.0, ge=0, validation_alias="LORABOT_VASTAI_UNKNOWN_GRACE_S")
    # ai-toolkit stages the bf16 FLUX transformer (~22 GiB) and T5 in host RAM: less gets OOM-killed
    min_cpu_ram_gb: float = Field(48.0, ge=0, validation_alias="LORABOT_MIN_CPU_RAM_GB")
    # bandwidth is billed per GB: offers dearer than this ($/GB, down or up) are never rented
    max_inet_cost_per_gb: float = Field(0.05, ge=0, validation_alias="LORABOT_MAX_INET_COST_PER_GB")

    # --- what to rent -------------------------------------------------------------------------
    # GPU model to rent
    gpu_name: str = Field("RTX 4090", validation_alias="LORABOT_GPU_NAME")
    # ai-toolkit's own image (repo at /app/ai-toolkit); it is built on CUDA 13, hence LORABOT_MIN_CUDA
    # pinned (issue 16): `:latest` floats, and the console output the parser reads changes between
    # versions; build_and_push_docker pushes `ostris/aitoolkit:<version.py VERSION>` beside `:latest`
    image: str = Field("ostris/aitoolkit:0.12.26", validation_alias="LORABOT_IMAGE")
    # disk rented with the machine, GB (the base model alone is ~34 GB)
    disk_gb: float = Field(80.0, ge=8, validation_alias="LORABOT_DISK_GB")
    max_price: float = Field(1.0, gt=0, validation_alias="LORABOT_MAX_PRICE")  # $/h, server cap
    # offers whose host reliability score (0..1) is lower are never rented
    min_reliability: float = Field(0.97, ge=0, le=1, validation_alias="LORABOT_MIN_RELIABILITY")
    # offers with slower download bandwidth (Mbit/s) are never rented
    min_inet_down: float = Field(200.0, ge=0, validation_alias="LORABOT_MIN_INET_DOWN")
    # offers whose driver supports an older CUDA are never rented (see `image`)
    min_cuda: float = Field(13.0, ge=0, validation_alias="LORABOT_MIN_CUDA")
    # offers tried, one after another, before renting fails
    rent_attempts: int = Field(5, ge=1, le=50, validation_alias="LORABOT_RENT_ATTEMPTS")

    # --- Discord ------------------------------------------------------------------------------
    # the bot's token (secret)
    discord_token: SecretStr | None = Field(None, validation_alias="DISCORD_TOKEN")
    # issue 13 (who may spend): the guilds the bot acts for (one id or a comma-separated list; `lorabot
    # run` refuses to start without it) and the roles, by id only (a role's name grants nothing)
    discord_guild_ids: Annotated[list[int], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("DISCORD_GUILD_ID", "discord_guild_id"))
    train_roles: Annotated[list[int], NoDecode] = Field(default_factory=list, validation_alias="LORABOT_TRAIN_ROLES")
    admin_roles: Annotated[list[int], NoDecode] = Field(default_factory=list, validation_alias="LORABOT_ADMIN_ROLES")
    # live status messages: at most one edit per interval (coalescing), and a fresh message before
    # Discord's cap on edits of messages older than an hour
    discord_edit_interval_s: float = Field(5.0, ge=0, validation_alias="LORABOT_DISCORD_EDIT_INTERVAL_S")
    discord_status_refresh_s: float = Field(50 * 60.0, gt=0, validation_alias="LORABOT_DISCORD_STATUS_REFRESH_S")
    # how long the Confirm / Cancel buttons of a quote stay pressable
    discord_confirm_timeout_s: float = Field(600.0, gt=0, validation_alias="LORABOT_DISCORD_CONFIRM_TIMEOUT_S")
    # largest /train attachment the bot downloads (also capped by LORABOT_DATASET_MAX_BYTES)
    discord_max_attachment_mb: int = Field(500, ge=1, validation_alias="LORABOT_DISCORD_MAX_ATTACHMENT_MB")
    # issue 15: the finished LoRA's link goes to its owner by DM only (the channel hears it is ready)
    links_by_dm: bool = Field(False, validation_alias="LORABOT_LINKS_BY_DM")
    # issue 15: per-user cooldowns of /offers (hits Vast.ai) and /train (downloads a dataset), seconds
    discord_offers_cooldown_s: float = Field(10.0, ge=0, validation_alias="LORABOT_DISCORD_OFFERS_COOLDOWN_S")
    discord_train_cooldown_s: float = Field(30.0, ge=0, validation_alias="LORABOT_DISCORD_TRAIN_COOLDOWN_S")

    # --- Cloudflare R2 ------------------------------------------------------------------------
    # Cloudflare account id (the endpoint is https://<id>.r2.cloudflarestorage.com)
    r2_account_id: str | None = Field(None, validation_alias="R2_ACCOUNT_ID")
    # R2 API token's key pair, scoped to the bucket (never sent to the box)
    r2_access_key_id: SecretStr | None = Field(None, validation_alias="R2_ACCESS_KEY_ID")
    r2_secret_access_key: SecretStr | None = Field(None, validation_alias="R2_SECRET_ACCESS_KEY")
    # the bucket LoRAs, checkpoints, logs and samples go to
    r2_bucket: str | None = Field(None, validation_alias="R2_BUCKET")
    # overrides the account's endpoint (tests: a local S3 server)
    r2_endpoint_url: str | None = Field(None, validation_alias="R2_ENDPOINT_URL")
    # public URL of the bucket; None: presigned links that expire
    r2_public_base_url: str | None = Field(None, validation_alias="R2_PUBLIC_BASE_URL")
    # lifetime of a presigned link (S3 allows at most 7 days)
    link_expiry_s: int = Field(7 * 24 * 3600, ge=60, le=7 * 24 * 3600, validation_alias="LORABOT_LINK_EXPIRY_S")
    # upload the trainer's intermediate checkpoints to R2 as they are written
    backup_checkpoints: bool = Field(True, validation_alias="LORABOT_BACKUP_CHECKPOINTS")
    # uploads from the bot's host: one streamed PUT up to the threshold (R2 takes up to 5 GiB; a LoRA
    # is < 1 GiB), multipart (boto3 transfer manager, parallel parts) above it. benchmarks/upload.py
    r2_multipart_threshold_mb: int = Field(1024, ge=5, le=5000, validation_alias="LORABOT_R2_MULTIPART_THRESHOLD_MB")
    r2_part_size_mb: int = Field(64, ge=5, le=5120, validation_alias="LORABOT_R2_PART_SIZE_MB")
    r2_max_concurrency: int = Field(8, ge=1, le=64, validation_alias="LORABOT_R2_MAX_CONCURRENCY")

    # --- Hugging Face (the only secret that goes to the rented box) ---------------------------
    hf_token: SecretStr | None = Field(None, validation_alias="HF_TOKEN")

    # --- local state --------------------------------------------------------------------------
    # the job store (SQLite)
    db_path: Path = Field(Path("./data/lorabot.sqlite3"), validation_alias="LORABOT_DB_PATH")
    # prefix of the rented machines' labels (which instances belong to this installation)
    label_prefix: str = Field("lorabot-", min_length=1, max_length=64, validation_alias="LORABOT_LABEL_PREFIX")
    # where datasets are unpacked and checked
    work_dir: Path = Field(Path("./data/work"), validation_alias="LORABOT_WORK_DIR")

    # --- dataset intake -----------------------------------------------------------------------
    # what happens to images without a caption
    missing_captions: MissingCaptionPolicy = Field(
        MissingCaptionPolicy.TRIGGER, validation_alias="LORABOT_MISSING_CAPTIONS"
    )
    # dataset caps: size, file count, fewest images, shortest image side (px)
    dataset_max_bytes: int = Field(2 * 1024**3, gt=0, validation_alias="LORABOT_DATASET_MAX_BYTES")
    dataset_max_files: int = Field(5000, gt=0, validation_alias="LORABOT_DATASET_MAX_FILES")
    dataset_min_images: int = Field(5, ge=1, validation_alias="LORABOT_DATASET_MIN_IMAGES")
    dataset_min_side: int = Field(256, ge=16, validation_alias="LORABOT_DATASET_MIN_SIDE")
    # lets URL intake reach 127.0.0.1 (tests and the local demo only)
    allow_loopback_urls: bool = Field(False, validation_alias="LORABOT_ALLOW_LOOPBACK_URLS")
    # largest single archive entry / file, and the zip-bomb guard (uncompressed/compressed per entry)
    dataset_max_file_bytes: int = Field(200 * 1024**2, gt=0, validation_alias="LORABOT_DATASET_MAX_FILE_BYTES")
    dataset_max_ratio: float = Field(100.0, gt=1, validation_alias="LORABOT_DATASET_MAX_RATIO")
    # decoded pixels per image (a decompression-bomb guard below Pillow's own 89 MP warning)
    dataset_max_pixels: int = Field(80_000_000, gt=0, validation_alias="LORABOT_DATASET_MAX_PIXELS")
    dataset_workers: int = Field(0, ge=0, le=64, validation_alias="LORABOT_DATASET_WORKERS")  # 0: auto
    # seconds a dataset download from a URL may take
    dataset_url_timeout_s: float = Field(120.0, gt=0, validation_alias="LORABOT_DATASET_URL_TIMEOUT_S")
    # extra CA bundle for URL intake (tests' self-signed server); None: the system's trust store
    dataset_url_ca_bundle: Path | None = Field(None, validation_alias="LORABOT_DATASET_URL_CA_BUNDLE")

    # --- the rented box -----------------------------------------------------------------------
    # lorabot's folder on the box, where the image keeps ai-toolkit, and the Python the box runs
    remote_root: str = Field("/workspace/lorabot", validation_alias="LORABOT_REMOTE_ROOT")
    aitoolkit_dir: str = Field("/app/ai-toolkit", validation_alias="LORABOT_AITOOLKIT_DIR")
    remote_python: str = Field("python3", validation_alias="LORABOT_REMOTE_PYTHON")
    # run with `sh -c` on the box: the GPU answers and the trainer is there
    ready_probe: str = Field(
        "nvidia-smi -L && test -f /app/ai-toolkit/run.py", validation_alias="LORABOT_READY_PROBE"
    )
    # how long a rented machine may take to become ready (image pull included)
    ready_timeout_s: float = Field(1200.0, gt=0, validation_alias="LORABOT_READY_TIMEOUT_S")
    # seconds an SSH connection may take to open
    ssh_connect_timeout_s: float = Field(15.0, gt=0, validation_alias="LORABOT_SSH_CONNECT_TIMEOUT_S")
    # keepalive every N s; the link counts as dead after ssh_keepalive_count unanswered ones
    ssh_keepalive_s: float = Field(15.0, gt=0, validation_alias="LORABOT_SSH_KEEPALIVE_S")
    # Vast.ai boxes log in as root; the local simulator logs in as whoever runs it
    ssh_user: str = Field("root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$", validation_alias="LORABOT_SSH_USER")
    # unanswered keepalives after which the SSH link counts as dead
    ssh_keepalive_count: int = Field(4, ge=1, validation_alias="LORABOT_SSH_KEEPALIVE_COUNT")
    # stop on the box: SIGINT, then SIGTERM after stop_grace, then SIGKILL after kill_grace more
    remote_stop_grace_s: float = Field(60.0, gt=0, validation_alias="LORABOT_REMOTE_STOP_GRACE_S")
    remote_kill_grace_s: float = Field(15.0, gt=0, validation_alias="LORABOT_REMOTE_KILL_GRACE_S")
    # how often the supervisor on the box writes its heartbeat
    remote_heartbeat_s: float = Field(5.0, gt=0, validation_alias="LORABOT_REMOTE_HEARTBEAT_S")

    # --- jobs, money and limits ---------------------------------------------------------------
    # jobs running at once, all users together, and per user
    max_concurrent_jobs: int = Field(4, ge=1, validation_alias="LORABOT_MAX_CONCURRENT_JOBS")
    max_jobs_per_user: int = Field(1, ge=1, validation_alias="LORABOT_MAX_JOBS_PER_USER")
    # jobs shipping their dataset at the same time, and datasets checked at the same time: both are
    # CPU-heavy bursts that would stall the event loop for every running job if unbounded
    max_concurrent_startups: int = Field(4, ge=1, validation_alias="LORABOT_MAX_CONCURRENT_STARTUPS")
    max_concurrent_intakes: int = Field(2, ge=1, validation_alias="LORABOT_MAX_CONCURRENT_INTAKES")
    # longest training run; money caps per job, per user per day, for the whole bot per day
    max_runtime_s: float = Field(4 * 3600.0, gt=0, validation_alias="LORABOT_MAX_RUNTIME_S")
    max_job_cost: float = Field(5.0, gt=0, validation_alias="LORABOT_MAX_JOB_COST")
    user_daily_budget: float = Field(10.0, gt=0, validation_alias="LORABOT_USER_DAILY_BUDGET")
    global_daily_budget: float = Field(50.0, gt=0, validation_alias="LORABOT_GLOBAL_DAILY_BUDGET")
    # no training progress this long: the job counts as stalled and stops
    stall_timeout_s: float = Field(900.0, gt=0, validation_alias="LORABOT_STALL_TIMEOUT_S")
    # issue 16 (the real ai-toolkit): images before 2026-06-24 print nothing while the ~34 GB base model
    # downloads, so until a training frame or a download bar shows up, silence may last this long
    load_stall_timeout_s: float = Field(3600.0, gt=0, validation_alias="LORABOT_LOAD_STALL_TIMEOUT_S")
    # `loss is nan` this many steps in a row stops the job (0: never); each one is reported at once
    nan_steps_limit: int = Field(5, ge=0, validation_alias="LORABOT_NAN_STEPS_LIMIT")
    # a cancelled job uploads the LoRA it has so far
    save_partial_on_cancel: bool = Field(True, validation_alias="LORABOT_SAVE_PARTIAL_ON_CANCEL")
    # how often the reaper looks for machines that should not be running
    reaper_interval_s: float = Field(300.0, gt=0, validation_alias="LORABOT_REAPER_INTERVAL_S")
    # how often a running job's log and status are read from the box
    monitor_interval_s: float = Field(5.0, gt=0, validation_alias="LORABOT_MONITOR_INTERVAL_S")
    # how often Vast.ai is asked whether a training job's instance is still there
    instance_check_s: float = Field(30.0, gt=0, validation_alias="LORABOT_INSTANCE_CHECK_S")
    # how often a running job posts an excerpt of its log
    log_snippet_interval_s: float = Field(600.0, gt=0, validation_alias="LORABOT_LOG_SNIPPET_INTERVAL_S")
    # how long a job may go without reaching its box before it counts as lost (then: one retry elsewhere)
    ssh_lost_timeout_s: float = Field(300.0, gt=0, validation_alias="LORABOT_SSH_LOST_TIMEOUT_S")
    # unconfirmed quotes expire; nothing is rented before confirmation
    confirm_timeout_s: float = Field(600.0, gt=0, validation_alias="LORABOT_CONFIRM_TIMEOUT_S")
    # credit must cover the quote's high estimate times this factor before renting
    credit_margin: float = Field(1.5, ge=1.0, validation_alias="LORABOT_CREDIT_MARGIN")
    # issue 13 (budgets that hold): per-user caps on open drafts and queued jobs, and a per-user rate
    # of /train intakes (dry runs included) per rolling hour; enforced by services/jobs/intake.py
    max_open_drafts_per_user: int = Field(2, ge=1, validation_alias="LORABOT_MAX_OPEN_DRAFTS_PER_USER")
    max_queued_per_user: int = Field(2, ge=1, validation_alias="LORABOT_MAX_QUEUED_PER_USER")
    train_rate: int = Field(10, ge=1, validation_alias="LORABOT_TRAIN_RATE")
    # how long a process holds a job it works on; a dead process's jobs are taken over after it
    lease_s: float = Field(60.0, gt=1, validation_alias="LORABOT_LEASE_S")
    # --- issue 13 (i13c): never lose the result; the reaper; local disk -----------------------
    # R2 down at collect: the upload from the kept local copy is retried, backoff between these
    collect_retry_min_s: float = Field(5.0, gt=0, validation_alias="LORABOT_COLLECT_RETRY_MIN_S")
    collect_retry_max_s: float = Field(300.0, gt=0, validation_alias="LORABOT_COLLECT_RETRY_MAX_S")
    # an instance labelled for this installation but unknown to its store is destroyed only when
    # seen twice at least this far apart (a rent whose id is not stored yet is not an orphan)
    reaper_unknown_grace_s: float = Field(600.0, ge=0, validation_alias="LORABOT_REAPER_UNKNOWN_GRACE_S")
    # intake refuses new datasets when the work folder's disk has less free space than this
    min_free_disk_gb: float = Field(5.0, ge=0, validation_alias="LORABOT_MIN_FREE_DISK_GB")

    # seconds per training step of an RTX 4090 at 1024 px; the quote scales it by resolution
    sec_per_step_4090: float = Field(1.6, gt=0, validation_alias="LORABOT_SEC_PER_STEP_4090")
    # per-GPU overrides of that s/step at 1024 px, JSON ({"RTX 3090": 3.0}); see services/quote.py
    sec_per_step_gpu: dict[str, float] = Field(default_factory=dict, validation_alias="LORABOT_SEC_PER_STEP_GPU")
    # quote inputs for the start-up phases (services/quote.py documents how they are used)
    quote_image_pull_s: float = Field(180.0, ge=0, validation_alias="LORABOT_QUOTE_IMAGE_PULL_S")
    quote_model_gb: float = Field(34.0, ge=0, validation_alias="LORABOT_QUOTE_MODEL_GB")
    quote_model_load_s: float = Field(240.0, ge=0, validation_alias="LORABOT_QUOTE_MODEL_LOAD_S")
    quote_upload_mbps: float = Field(100.0, gt=0, validation_alias="LORABOT_QUOTE_UPLOAD_MBPS")

    # --- issue 13 (i13b): nothing bills unwatched -----------------------------------------------
    # every command on the box ends within this many seconds (a hung one is an infrastructure failure)
    box_command_timeout_s: float = Field(120.0, gt=0, validation_alias="LORABOT_BOX_COMMAND_TIMEOUT_S")
    # transfers may take the command timeout plus their size at this floor throughput (MB/s)
    transfer_floor_mb_s: float = Field(1.0, gt=0, validation_alias="LORABOT_TRANSFER_FLOOR_MB_S")
    # the watchdog stops a job at max_runtime + this grace, or at max_job_cost x margin, whatever SSH does
    watchdog_interval_s: float = Field(15.0, gt=0, validation_alias="LORABOT_WATCHDOG_INTERVAL_S")
    watchdog_grace_s: float = Field(600.0, ge=0, validation_alias="LORABOT_WATCHDOG_GRACE_S")
    watchdog_cost_margin: float = Field(1.1, ge=1.0, validation_alias="LORABOT_WATCHDOG_COST_MARGIN")
    # the box ends its own rental when the bot has not touched its heartbeat for this long
    deadman_s: float = Field(1800.0, gt=0, validation_alias="LORABOT_DEADMAN_S")
    # where the box finds CONTAINER_ID / CONTAINER_API_KEY (Vast.ai sets them for PID 1, not for SSH),
    # and the pid its dead-man's switch stops when the API refuses (`kill 1`; 0: never, the simulator)
    box_container_environ: str = Field("/proc/1/environ", validation_alias="LORABOT_BOX_CONTAINER_ENVIRON")
    box_container_pid: int = Field(1, ge=0, validation_alias="LORABOT_BOX_CONTAINER_PID")
    # the partial-LoRA save of a cancel is bounded; the destroy follows whatever happens in it
    cancel_save_timeout_s: float = Field(300.0, gt=0, validation_alias="LORABOT_CANCEL_SAVE_TIMEOUT_S")
    # operator alerts (destroy failures); None: the log only
    admin_channel_id: int | None = Field(None, validation_alias="LORABOT_ADMIN_CHANNEL_ID")
    # Discord login retries (a revoked token or an outage): backoff from min to max seconds
    discord_login_backoff_s: float = Field(5.0, gt=0, validation_alias="LORABOT_DISCORD_LOGIN_BACKOFF_S")
    discord_login_backoff_max_s: float = Field(300.0, gt=0, validation_alias="LORABOT_DISCORD_LOGIN_BACKOFF_MAX_S")
    # --- issue 18: overhead, prefetch and warm machines ------------------------------------------
    # fetch the base model into the box's HF cache at readiness, while the dataset is shipped
    prefetch_model: bool = Field(True, validation_alias="LORABOT_PREFETCH_MODEL")
    # HF_HOME for the prefetch and the trainer on the box ("" = the box's default ~/.cache/huggingface)
    remote_hf_home: str = Field("", validation_alias="LORABOT_REMOTE_HF_HOME")
    # hand a finished job's machine to a queued job that can use it instead of destroying it
    warm_reuse: bool = Field(True, validation_alias="LORABOT_WARM_REUSE")
    # a warm machine's idle wait, jobs per machine, and age after which it takes no new job
    warm_idle_s: float = Field(120.0, ge=0, validation_alias="LORABOT_WARM_IDLE_S")
    warm_max_jobs: int = Field(5, ge=1, validation_alias="LORABOT_WARM_MAX_JOBS")
    warm_max_age_s: float = Field(6 * 3600.0, gt=0, validation_alias="LORABOT_WARM_MAX_AGE_S")

    @field_validator(
        "vastai_api_url", "r2_endpoint_url", "r2_public_base_url", "r2_account_id", "r2_bucket", mode="before"
    )
    @classmethod
    def _strip_empty(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            return v or None
        return v

    @field_validator("db_path", "work_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        # made absolute once, at start: a later chdir (or another cwd for `lorabot`) must not
        # point the bot at another store and so at other jobs' instances (review H5)
        return v if str(v) == ":memory:" else v.expanduser().absolute()

    @field_validator("train_roles", "admin_roles", "discord_guild_ids", mode="before")
    @classmethod
    def _split_list(cls, v: Any) -> Any:
        # accept "123, 456" as well as a JSON list or one number; only numeric ids are valid
        if isinstance(v, int):
            return [v]
        if isinstance(v, str) and not v.strip().startswith("["):
            return [part.strip() for part in v.split(",") if part.strip()]
        return v

    @property
    def discord_guild_id(self) -> int | None:
        """The first allowed guild (where operator-facing things go when a job names none)."""
        return self.discord_guild_ids[0] if self.discord_guild_ids else None
    @field_validator("vastai_label_rechecks_s", mode="before")
    @classmethod
    def _split_delays(cls, v: Any) -> Any:  # issue 14: "60,180,600" as well as a JSON list
        if isinstance(v, str) and not v.strip().startswith("["):
            return [float(part) for part in v.split(",") if part.strip()]
        return v

    # --- helpers ------------------------------------------------------------------------------
    def require(self, *fields: str, why: str = "") -> None:
        """Fail with one line naming the first missing setting among `fields`."""
        for name in fields:
            if getattr(self, name) in (None, ""):
                raise SettingsError(f"{env_name(name)} is not set" + (f" (needed {why})" if why else ""))

    def secret_values(self) -> list[str]:
        """Plain values of every secret, for redaction of outgoing text. Never print these."""
        out = []
        for name in type(self).model_fields:
            if name in _NOT_REDACTED:
                continue
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
                if len(raw) >= 4:
                    out.append(raw)
        return out

    @property
    def ssh_key_path(self) -> Path:
        return self.vastai_ssh_key_path.expanduser()


def env_name(field: str) -> str:
    """The environment variable a field is read from."""
    info = Settings.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return field.upper()


def _describe(error: dict[str, Any]) -> str:
    loc = error.get("loc") or ("?",)
    field = str(loc[0])
    name = env_name(field) if field in Settings.model_fields else field.upper()
    # never echo the input: it may be a secret
    return f"{name}: {error.get('msg', 'invalid value')}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings; a malformed value raises SettingsError naming the variable, in one line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        raise SettingsError(f"invalid setting {_describe(dict(first))}") from None
    except _SourceError as exc:
        # pydantic-settings names the field in its message ('... for field "x" ...')
        field = str(exc).split('"')[1] if '"' in str(exc) else "?"
        name = env_name(field) if field in Settings.model_fields else field
        raise SettingsError(f"invalid setting {name}: cannot parse the value") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


# R2's access key id is half of a key pair, not a secret on its own: every presigned link carries it
# (X-Amz-Credential=<id>/...), so redacting it would break each link lorabot posts. It stays a
# SecretStr so that settings dumps never show it.
_NOT_REDACTED = frozenset({"r2_access_key_id"})


def redact(text: str, secrets: list[str]) -> str:
    """Replace every secret value in `text` with a marker."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "[redacted]")
    return text
