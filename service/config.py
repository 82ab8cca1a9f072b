"""Settings, read once from the environment (12-factor).

Every knob the service has is here, with its environment variable, its default and its limits, so that
README's configuration table and the code cannot drift apart: `Settings.describe()` is what the table is
checked against in the tests.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .keys import InvalidSetting, check_auth_settings

__all__ = ["ConfigError", "Settings", "parse_setting"]



def _frontend() -> Path:
    """The chat page: inside the installed package (service/frontend/, package data of the wheel), or in a
    source checkout the repository's frontend/ (where the page lives; pyproject.toml maps it into the package)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "frontend", here.parent / "frontend"):
        if (candidate / "index.html").is_file():
            return candidate
    return here / "frontend"


_FRONTEND = _frontend()
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "none")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable and what to do."""


def _env(name: str, default: Any, help: str, minimum: float | None = None) -> Any:
    return field(default=default, metadata={"env": name, "help": help, "min": minimum})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = _env("HOST", "127.0.0.1", "Address to listen on (`0.0.0.0` in containers).")
    port: int = _env("PORT", 8000, "TCP port to listen on.", 0)
    workers: int = _env(
        "WORKERS", 1, "Server processes per instance, sharing the port; more than 1 needs `REDIS_URL`.", 1
    )
    redis_url: str | None = _env(
        "REDIS_URL", None,
        "Redis to relay through: `redis://`, `rediss://`, `unix://`; `redis+cluster://host:port` for Redis Cluster; "
        "`redis+sentinel://host:26379/master-name` for Sentinel. Unset: in-process broker, one process only.",
    )
    redis_key_prefix: str = _env("REDIS_KEY_PREFIX", "sse", "Prefix of every Redis key and pub/sub channel.")
    redis_probe_interval: float = _env(
        "REDIS_PROBE_INTERVAL", 2.0,
        "Seconds between probes of the pub/sub connection; a silent connection is restarted after 2 probes.", 0.1,
    )
    redis_pool_size: int = _env(
        "REDIS_POOL_SIZE", 32,
        "Redis commands in flight at once per process (publishes, history pages, gap fills); more wait in line.", 1,
    )
    redis_pool_timeout: float = _env(
        "REDIS_POOL_TIMEOUT", 2.0,
        "Seconds a command waits for a free Redis connection before the request gets 503 `busy`.", 0.01,
    )
    redis_command_timeout: float = _env(
        "REDIS_COMMAND_TIMEOUT", 3.0,
        "Seconds to wait for Redis's answer; a publish without one gets 504 `outcome_unknown`.", 0.1,
    )
    redis_connect_timeout: float = _env("REDIS_CONNECT_TIMEOUT", 2.0, "Seconds to open a connection to Redis.", 0.1)
    redis_wait_replicas: int = _env(
        "REDIS_WAIT_REPLICAS", 0,
        "Answer a publish 202 only once this many replicas have it (Redis `WAIT`); `0`: when the primary has it.", 0,
    )
    redis_wait_timeout: float = _env(
        "REDIS_WAIT_TIMEOUT", 1.0, "Seconds `REDIS_WAIT_REPLICAS` waits before the publish gets 504.", 0.01
    )
    history_size: int = _env("HISTORY_SIZE", 1000, "Messages kept per channel for resume (approximate with Redis).", 1)
    history_ttl: float = _env("HISTORY_TTL", 3600.0, "Seconds a message stays resumable.", 1)
    history_meta_ttl: float = _env(
        "HISTORY_META_TTL", 86400.0,
        "Seconds a channel's epoch and last id outlive its history, so a late resume is told what it missed.", 1,
    )
    history_page_bytes: int = _env(
        "HISTORY_PAGE_BYTES", 1048576,
        "Bytes of history one Redis read may return (in messages of `MAX_MESSAGE_BYTES`); resumes read page by page.",
        1024,
    )
    history_reads: int = _env(
        "HISTORY_READS", 8, "History pages read from Redis at once per process; more resumes wait their turn.", 1
    )
    idempotency_ttl: float = _env(
        "IDEMPOTENCY_TTL", 300.0, "Seconds a publish's `Idempotency-Key` is remembered (a retry gets the same id).", 1
    )
    heartbeat_interval: float = _env("HEARTBEAT_INTERVAL", 15.0, "Seconds between heartbeat comments on streams.", 0.05)
    retry_ms: int = _env("RETRY_MS", 3000, "Reconnect delay sent to clients (`retry:`), in milliseconds.", 0)
    max_message_bytes: int = _env(
        "MAX_MESSAGE_BYTES", 65536, "Largest accepted request body, in bytes (413 above).", 64
    )
    max_channel_length: int = _env(
        "MAX_CHANNEL_LENGTH", 128, "Longest channel name (charset `A-Z a-z 0-9 _ - . :`).", 1
    )
    max_channels_per_stream: int = _env("MAX_CHANNELS_PER_STREAM", 16, "Channels one `/events` stream may join.", 1)
    max_streams: int = _env(
        "MAX_STREAMS", 20000, "Open streams per instance; above it a stream gets `retry:` and ends (200).", 1
    )
    subscriber_queue_size: int = _env(
        "SUBSCRIBER_QUEUE_SIZE", 1000, "Messages buffered per stream before a slow client is cut off.", 1
    )
    subscriber_queue_bytes: int = _env(
        "SUBSCRIBER_QUEUE_BYTES", 524288, "Bytes buffered per stream before a slow client is cut off.", 1024
    )
    send_timeout: float = _env(
        "SEND_TIMEOUT", 10.0, "Seconds one write to a client may block before the client is cut off.", 0.1
    )
    send_buffer_bytes: int = _env(
        "SEND_BUFFER_BYTES", 131072,
        "Kernel send buffer per connection (SO_SNDBUF); bounds what a stalled client absorbs before it is noticed. "
        "`0`: the kernel's autotuning (up to megabytes).", 0,
    )
    request_timeout: float = _env(
        "REQUEST_TIMEOUT", 10.0, "Seconds a request's headers and body may take to arrive; then the connection closes.",
        0.1,
    )
    keepalive_timeout: float = _env(
        "KEEPALIVE_TIMEOUT", 75.0,
        "Seconds an idle keep-alive connection stays open; keep it above your proxy's idle timeout (nginx: 60).", 1,
    )
    http_protocol: str = _env(
        "HTTP_PROTOCOL", "sse-relay",
        "HTTP/1.1 connection code: `sse-relay` (the service's own, lean) or `uvicorn` (uvicorn's, with the same "
        "guards; slower to open streams).",
    )
    max_connections_per_client: int = _env(
        "MAX_CONNECTIONS_PER_CLIENT", 1000,
        "Open TCP connections per client address (trusted proxies exempt); more are closed at once; `0` = off.", 0,
    )
    drain_grace: float = _env(
        "DRAIN_GRACE", 10.0, "Seconds over which SIGTERM spreads the closing of open streams before exit.", 0
    )
    max_batch: int = _env("MAX_BATCH", 100, "Messages one `POST /publish` may carry.", 1)
    presence_interval: float = _env(
        "PRESENCE_INTERVAL", 5.0, "Seconds between presence refreshes; a dead replica's count expires after 3.", 0.1
    )
    presence_events: bool = _env(
        "PRESENCE_EVENTS", False, "Publish `relay.join` / `relay.leave` events when streams join or leave a channel."
    )
    default_channel: str = _env("DEFAULT_CHANNEL", "chat", "Channel of the old chat endpoints `/server/*`.")
    cors_origins: tuple[str, ...] = _env(
        "CORS_ORIGINS", (), "Comma-separated origins allowed to call the API from a browser (`*` for any)."
    )
    cors_allow_credentials: bool = _env(
        "CORS_ALLOW_CREDENTIALS", False, "Let listed origins send cookies (never together with `*`)."
    )
    # -- who may publish and subscribe, and limits per client (service/auth.py, service/ratelimit.py) --
    public_channels: tuple[str, ...] = _env(
        "PUBLIC_CHANNELS", ("chat",),
        "Comma-separated channel globs anyone may publish to and subscribe to without a token (`*`: all). "
        "Every other channel needs a token, or the authorization hook's allow (`AUTH_HOOK_URL`).",
    )
    jwt_secret: str | None = field(default=None, repr=False, metadata={"env": "JWT_SECRET", "min": None, "help": (
        "Secret verifying HS256 tokens (32+ bytes). Without it, `JWT_PUBLIC_KEY` and `AUTH_HOOK_URL`, private channels "
        "are closed.")})
    jwt_public_key: str | None = _env(
        "JWT_PUBLIC_KEY", None, "PEM public key (the text, or a file path) verifying RS256/ES256 tokens."
    )
    jwt_algorithms: tuple[str, ...] = _env(
        "JWT_ALGORITHMS", (), "Accepted token algorithms; unset: HS256 with `JWT_SECRET` plus the public key's own."
    )
    jwt_audience: str | None = _env(
        "JWT_AUDIENCE", None, "Required `aud` of tokens (unset: tokens with an `aud` are refused)."
    )
    jwt_issuer: str | None = _env("JWT_ISSUER", None, "Required `iss` of tokens (unset: not checked).")
    auth_cookie: str = _env(
        "AUTH_COOKIE", "sse_token", "Cookie holding the token, for EventSource (it cannot set headers)."
    )
    allow_query_token: bool = _env(
        "ALLOW_QUERY_TOKEN", False, "Also accept `?token=` (URLs land in proxy logs and history; prefer the cookie)."
    )
    publish_rate_limit: float = _env(
        "PUBLISH_RATE_LIMIT", 20.0,
        "Publishes per second per client (token `sub`, else IP), in bursts of as many; 429 above; `0` = off.", 0,
    )
    max_streams_per_client: int = _env(
        "MAX_STREAMS_PER_CLIENT", 100, "Open streams per client on one instance (429 above); `0` = off.", 0
    )
    max_header_bytes: int = _env(
        "MAX_HEADER_BYTES", 16384, "Largest total size of a request's headers (431 above).", 1024
    )
    max_json_depth: int = _env("MAX_JSON_DEPTH", 64, "Deepest nesting of a request body's JSON (400 above).", 4)
    trust_proxy_headers: tuple[str, ...] = _env(
        "TRUST_PROXY_HEADERS", (),
        "Comma-separated addresses/CIDRs of your proxies (`10.0.0.0/8,127.0.0.1`). From them only, the client "
        "address is `X-Forwarded-For`'s rightmost hop that is not one of them; they are exempt from "
        "`MAX_CONNECTIONS_PER_CLIENT`. Empty: the peer address, headers ignored.",
    )
    # -- your backend decides (service/hooks.py, service/control.py; docs/security.md) --
    auth_hook_url: str | None = _env(
        "AUTH_HOOK_URL", None,
        "URL the relay POSTs to, with the client's `Cookie` and `Authorization`, to ask whether it may open a stream "
        "or publish on a channel that is neither public nor granted by a valid token (docs/security.md). Unset: "
        "no hook.",
    )
    publish_hook_url: str | None = _env(
        "PUBLISH_HOOK_URL", None,
        "URL every client publish is POSTed to before it goes out: the backend accepts it (optionally replacing "
        "`data`) or rejects it with the status and error the client gets. Unset: no hook.",
    )
    hook_timeout: float = _env(
        "HOOK_TIMEOUT", 0.5,
        "Seconds a hook call may take, waiting for a free slot included; then the request is refused (publish 503, "
        "stream 200 + `retry:`), never allowed.", 0.01,
    )
    hook_concurrency: int = _env(
        "HOOK_CONCURRENCY", 64,
        "Calls in flight at once per hook and process; identical authorization calls in flight are made once.", 1,
    )
    auth_hook_cache_size: int = _env(
        "AUTH_HOOK_CACHE_SIZE", 10000,
        "Authorization decisions remembered per process (least recently used dropped first); `0`: none.", 0,
    )
    auth_hook_max_cache_seconds: float = _env(
        "AUTH_HOOK_MAX_CACHE_SECONDS", 60.0,
        "Longest a decision is remembered, whatever the hook's `cache_seconds` asks.", 0,
    )
    admin_api_key: str | None = field(default=None, repr=False, metadata={"env": "ADMIN_API_KEY", "min": None, "help": (
        "Key of the admin API (`POST /admin/end`: end a user's or a channel's streams on every replica), sent as "
        "`Authorization: Bearer <key>`; 16+ characters. Unset: the admin API answers 401.")})
    gc_thresholds: str = _env(
        "GC_THRESHOLDS", "50000,50,1000",
        "Python's cyclic GC thresholds for `python -m service` (3 integers, or `default`); objects alive after "
        "start-up are frozen out of collection. Fewer, larger passes: most of the fan-out latency tail otherwise.",
    )
    log_level: str = _env("LOG_LEVEL", "info", "`debug`, `info`, `warning` or `error`.")
    log_format: str = _env("LOG_FORMAT", "text", "`text` for people, `json` for log pipelines.")
    instance_id: str = _env(
        "INSTANCE_ID", "", "Name of this replica in logs and the `X-Relay-Instance` header (default host:pid)."
    )
    frontend_dir: str = _env("FRONTEND_DIR", str(_FRONTEND), "Folder of the chat page served at `/`.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `environ` (default `os.environ`); `overrides` win, for embedding and tests."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if f.name in overrides:
                values[f.name] = overrides.pop(f.name)
                continue
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = parse_setting(name, raw.strip(), f.default, f.metadata["min"], f.type)
        if overrides:
            raise ConfigError(f"unknown settings: {', '.join(sorted(overrides))}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.workers > 1 and not self.redis_url:
            raise ConfigError(
                f"WORKERS={self.workers} needs REDIS_URL: worker processes reach each other's subscribers only "
                "through Redis. Set REDIS_URL, or WORKERS=1 for the embedded broker"
            )
        if "*" in self.cors_origins and self.cors_allow_credentials:
            raise ConfigError(
                "CORS_ORIGINS='*' cannot be combined with CORS_ALLOW_CREDENTIALS=true: "
                "list the origins that may send credentials instead"
            )
        if self.redis_wait_replicas and self.redis_wait_timeout >= self.redis_command_timeout:
            raise ConfigError(
                f"REDIS_WAIT_TIMEOUT ({self.redis_wait_timeout}) must be below REDIS_COMMAND_TIMEOUT "
                f"({self.redis_command_timeout}): the publish waits for both Redis's answer and its replicas'"
            )
        for name, url in (("AUTH_HOOK_URL", self.auth_hook_url), ("PUBLISH_HOOK_URL", self.publish_hook_url)):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{name} must be an http:// or https:// URL, not {url!r}")
        if self.admin_api_key is not None and len(self.admin_api_key) < 16:
            raise ConfigError("ADMIN_API_KEY must be at least 16 characters: it ends anyone's streams")
        self.gc_threshold_values()
        self.trusted_proxy_networks()
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT must be 'text' or 'json', not {self.log_format!r}")
        if self.http_protocol not in ("sse-relay", "uvicorn"):
            raise ConfigError(f"HTTP_PROTOCOL must be 'sse-relay' or 'uvicorn', not {self.http_protocol!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"LOG_LEVEL must be debug, info, warning or error, not {self.log_level!r}")
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://", "redis+cluster://", "redis+sentinel://")
        ):
            raise ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix://, not {self.redis_url!r}")
        try:  # keys are parsed here, so a bad key stops the service at start
            check_auth_settings(self.jwt_secret, self.jwt_public_key, self.jwt_algorithms, self.public_channels,
                                self.auth_cookie)
        except InvalidSetting as exc:
            raise ConfigError(str(exc)) from None

    def gc_threshold_values(self) -> tuple[int, int, int] | None:
        """The three GC thresholds, or None for Python's defaults."""
        if self.gc_thresholds.strip().lower() == "default":
            return None
        try:
            a, b, c = (int(part) for part in self.gc_thresholds.split(","))
        except ValueError:
            raise ConfigError(
                f"GC_THRESHOLDS must be three integers like 50000,50,1000 (or `default`), not {self.gc_thresholds!r}"
            ) from None
        return a, b, c

    def trusted_proxy_networks(self) -> tuple[IPNetwork, ...]:
        """TRUST_PROXY_HEADERS as networks (an address is a /32 or /128); () when no proxy is trusted."""
        raw: Any = self.trust_proxy_headers
        if isinstance(raw, bool):  # Settings(trust_proxy_headers=...) from Python, as the old setting was a bool
            raw = ("true",) if raw else ()
        elif isinstance(raw, str):
            raw = raw.split(",")
        entries = [str(entry).strip() for entry in raw if str(entry).strip()]
        if len(entries) == 1 and entries[0].lower() in _FALSE:
            return ()  # the old `false`: nobody, as before
        networks = []
        for entry in entries:
            if entry.lower() in _TRUE or entry == "*":
                raise ConfigError(
                    f"TRUST_PROXY_HEADERS={entry!r} is not accepted: it would believe X-Forwarded-For from anyone "
                    "who connects, so a client could choose its own identity for the per-client limits. List the "
                    "addresses or CIDRs of the proxies in front of the relay instead, e.g. "
                    "TRUST_PROXY_HEADERS=10.0.0.0/8 or TRUST_PROXY_HEADERS=127.0.0.1 (empty: trust nobody)"
                )
            try:
                networks.append(ipaddress.ip_network(entry.removeprefix("[").replace("]", "")))
            except ValueError as exc:
                raise ConfigError(
                    f"TRUST_PROXY_HEADERS: {entry!r} is not an IP address or CIDR ({exc}); write your proxies' "
                    "addresses or networks, comma-separated, e.g. 10.0.0.0/8,127.0.0.1,fd00::/8"
                ) from None
        return tuple(networks)

    @property
    def history_page_entries(self) -> int:
        """Messages per history page: as many messages of the largest size as fit `HISTORY_PAGE_BYTES`."""
        return max(1, min(1000, self.history_page_bytes // max(1, self.max_message_bytes)))

    @property
    def instance(self) -> str:
        return self.instance_id or f"{socket.gethostname()}:{os.getpid()}"

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, meaning) for every setting: the README table's source of truth."""
        rows = []
        for f in fields(cls):
            default = f.default
            shown = "unset" if default is None else ",".join(default) if isinstance(default, tuple) else str(default)
            if f.name == "frontend_dir":
                shown = "`frontend/`"
            rows.append((f.metadata["env"], shown, f.metadata["help"]))
        return rows


def parse_setting(name: str, raw: str, default: Any, minimum: float | None, kind: Any) -> Any:
    """One setting's value from its text; a ConfigError names `name` (the variable, or the flag and the variable
    for the command line, service/cli.py)."""
    kind_s = str(kind)
    try:
        if isinstance(default, bool) or "bool" in kind_s:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(default, int):
            value: float = int(raw)
        elif isinstance(default, float):
            value = float(raw)
        else:
            return raw
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not valid ({exc}); see README's configuration table") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} is below its minimum {minimum}")
    return value
