"""The configuration: an INI file, every key overridable by ``DTSBRIDGE_<SECTION>_<KEY>``.

Relative paths in the file are relative to the file's own folder. A bad value
raises :class:`ConfigError` whose message names the section and key, and the
service refuses to start with that one line.
"""

from __future__ import annotations

import configparser
import os
from typing import Literal, Mapping, overload

import attrs

from dtsbridge.engine import CHECKSUMS


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


# Every key the service knows, with its default. Keys not listed here are
# refused, so a typo is caught at startup instead of silently ignored.
DEFAULTS: dict[str, dict[str, str]] = {
    "server": {"listen": "tcp:8080:interface=127.0.0.1", "public_url": "", "log_format": "text",
               "read_timeout_seconds": "20"},
    "redis": {"url": "embedded", "timeout_seconds": "5", "key_prefix": "dtsbridge"},
    "state": {"dir": "../var/state", "retention_days": "30"},
    "paths": {
        "dts_root": "../var/dts",
        "user_root": "../var/users",
        "target_subdir": "",
        "delete_source": "false",
    },
    "auth": {
        "backend": "tokens",
        "tokens_file": "tokens.ini",
        "kbase_url": "https://kbase.us/services/auth",
        "transfer_role": "DTS_TRANSFER",
        "cache_seconds": "300",
        "timeout_seconds": "10",
        "service_token": "",
    },
    "users": {"check": "directory"},
    "ownership": {"mode": "none", "uid": "", "gid": ""},
    "copy": {
        "threads": "4",
        "processes": "auto",
        "max_jobs": "4",
        "max_payload_gb": "",
        "checksum": "xxh3",
        "fsync": "true",
        "lease_seconds": "15",
        "max_jobs_per_user": "",
        "reflink": "auto",
        "stall_seconds": "900",
    },
    "staging": {"timeout_seconds": "86400", "max_timeout_seconds": "604800"},
    "watch": {"enabled": "false", "interval_seconds": "2", "settle_seconds": "2"},
    "drain": {"grace_seconds": "30"},
    "notify": {"webhook_urls": "", "webhook_secret": "", "retry_hours": "24", "events": "end",
               "retry_first_seconds": "10"},
}


@attrs.frozen
class Config:
    """Every setting, parsed and checked."""

    source: str
    unknown_keys: tuple[str, ...]
    listen: str
    public_url: str
    log_format: str
    redis_url: str
    redis_timeout: float
    key_prefix: str
    state_dir: str
    retention_seconds: float
    dts_root: str
    user_root: str
    target_subdir: tuple[str, ...]
    delete_source: bool
    auth_backend: str
    tokens_file: str
    kbase_url: str
    transfer_role: str
    auth_cache_seconds: float
    auth_timeout: float
    service_token: str
    users_check: str
    ownership: str
    uid: int | None
    gid: int | None
    threads: int
    processes: int
    max_jobs: int
    max_payload_bytes: int | None
    checksum: str
    fsync: bool
    lease_seconds: float
    max_jobs_per_user: int | None
    reflink: str
    stall_seconds: float
    staging_timeout: float
    staging_max_timeout: float
    watch_enabled: bool
    watch_interval: float
    watch_settle: float
    drain_grace: float
    #: seconds a client has to send a whole request (headers and body); 0 = no limit
    read_timeout: float = 20.0
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: str = ""
    webhook_retry_hours: float = 24.0
    webhook_events: str = "end"
    webhook_retry_first: float = 10.0


def _bool(section: str, key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"[{section}] {key}: expected true or false, got {value!r}")


@overload
def _number(section: str, key: str, value: str, *, minimum: float = 0, optional: Literal[False] = False) -> int: ...
@overload
def _number(section: str, key: str, value: str, *, minimum: float = 0, optional: Literal[True]) -> int | None: ...
@overload
def _number(section: str, key: str, value: str, kind: type[float], minimum: float = 0,
            optional: Literal[False] = False) -> float: ...
@overload
def _number(section: str, key: str, value: str, kind: type[float], minimum: float = 0,
            optional: Literal[True] = ...) -> float | None: ...


def _number(section: str, key: str, value: str, kind: type[float] = int, minimum: float = 0,
            optional: bool = False) -> float | None:
    v = value.strip()
    if optional and v == "":
        return None
    try:
        n = kind(v)
    except ValueError:
        raise ConfigError(f"[{section}] {key}: expected a number, got {value!r}") from None
    if n != n or n in (float("inf"), float("-inf")):
        raise ConfigError(f"[{section}] {key}: expected a finite number, got {value!r}")
    if n < minimum:
        raise ConfigError(f"[{section}] {key}: must be at least {minimum}, got {value!r}")
    return n


def _processes(value: str) -> int:
    """``[copy] processes``: ``auto`` (one per CPU, at most 8), or a count (0: threads only)."""
    if value.strip().lower() == "auto":
        return max(1, min(8, os.cpu_count() or 1))
    return _number("copy", "processes", value, minimum=0)


def _choice(section: str, key: str, value: str, choices: tuple[str, ...]) -> str:
    v = value.strip().lower()
    if v not in choices:
        raise ConfigError(f"[{section}] {key}: expected one of {', '.join(choices)}, got {value!r}")
    return v


def _separate_roots(dts_root: str, user_root: str) -> None:
    """The DTS area and the users' datastores must not overlap (compared as real paths, links resolved):
    otherwise a DTS token could copy one user's datastore into another's."""
    d, u = os.path.realpath(dts_root), os.path.realpath(user_root)
    if d == u:
        raise ConfigError(f"[paths] dts_root, user_root: both are {d}; they must be separate folders")
    if os.path.commonpath([d, u]) == u:
        raise ConfigError(f"[paths] dts_root, user_root: dts_root {d} is inside user_root {u}; "
                          f"they must not overlap")
    if os.path.commonpath([d, u]) == d:
        raise ConfigError(f"[paths] dts_root, user_root: user_root {u} is inside dts_root {d}; "
                          f"they must not overlap")


def read_raw(path: str | None, environ: Mapping[str, str] | None = None) -> tuple[dict[str, dict[str, str]], str]:
    """The merged settings (defaults < file < environment) and the folder relative paths start from.

    Keys the service does not know are collected under ``"_unknown"`` so that
    startup can warn about them (a typo) without refusing a newer file.
    """
    environ = os.environ if environ is None else environ
    values = {s: dict(keys) for s, keys in DEFAULTS.items()}
    unknown: list[str] = []
    base = os.getcwd()
    if path is not None:
        parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except configparser.Error as e:
            raise ConfigError(f"config file {path}: {e}") from None
        base = os.path.dirname(os.path.abspath(path))
        for section in parser.sections():
            if section not in values:
                unknown.append(f"[{section}]")
                continue
            for key, value in parser.items(section):
                if key not in values[section]:
                    unknown.append(f"[{section}] {key}")
                    continue
                values[section][key] = value
    for section, keys in values.items():
        for key in list(keys):
            env = f"DTSBRIDGE_{section.upper()}_{key.upper()}"
            if env in environ:
                keys[key] = environ[env]
    values["_unknown"] = {u: "" for u in unknown}
    return values, base


def load(path: str | None, overrides: Mapping[str, Mapping[str, str]] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge and check the configuration; ``overrides`` (command-line options) win."""
    v, base = read_raw(path, environ)
    for section, keys in (overrides or {}).items():
        for key, value in keys.items():
            if value is not None:
                v[section][key] = value

    def p(section: str, key: str, required: bool = True) -> str:
        raw = v[section][key].strip()
        if not raw:
            if required:
                raise ConfigError(f"[{section}] {key}: must not be empty")
            return ""
        return os.path.normpath(os.path.join(base, os.path.expanduser(raw)))

    target_subdir = v["paths"]["target_subdir"].strip().strip("/")
    parts = tuple(x for x in target_subdir.split("/") if x)
    for part in parts:
        if part in (".", "..") or part.startswith(".dtsbridge-"):
            raise ConfigError(f"[paths] target_subdir: {target_subdir!r} must be a plain relative folder name")

    ownership = _choice("ownership", "mode", v["ownership"]["mode"], ("none", "fixed", "passwd"))
    uid = _number("ownership", "uid", v["ownership"]["uid"], optional=True)
    gid = _number("ownership", "gid", v["ownership"]["gid"], optional=True)
    if ownership == "fixed" and (uid is None or gid is None):
        raise ConfigError("[ownership] uid: mode = fixed needs both uid and gid")

    backend = _choice("auth", "backend", v["auth"]["backend"], ("tokens", "kbase"))
    users_check = _choice("users", "check", v["users"]["check"], ("directory", "kbase", "passwd"))
    service_token = v["auth"]["service_token"].strip()
    if users_check == "kbase" and not service_token:
        raise ConfigError("[auth] service_token: [users] check = kbase needs a service token")
    role = v["auth"]["transfer_role"].strip()
    if not role:
        raise ConfigError("[auth] transfer_role: must not be empty")

    gb = _number("copy", "max_payload_gb", v["copy"]["max_payload_gb"], kind=float, optional=True)
    per_user = _number("copy", "max_jobs_per_user", v["copy"]["max_jobs_per_user"], minimum=1, optional=True)
    log_format = _choice("server", "log_format", v["server"]["log_format"], ("text", "json"))
    read_timeout = _number("server", "read_timeout_seconds", v["server"]["read_timeout_seconds"], kind=float)
    if not read_timeout < 86400:  # also NaN and inf
        raise ConfigError("[server] read_timeout_seconds: must be a number of seconds below 86400 (0: no limit)")
    listen = v["server"]["listen"].strip()
    if not listen:
        raise ConfigError("[server] listen: must not be empty")
    redis_url = v["redis"]["url"].strip()
    if not redis_url:
        raise ConfigError("[redis] url: must not be empty")
    if redis_url != "embedded" and not redis_url.startswith(("redis://", "unix://", "redis+sentinel://")):
        raise ConfigError(f"[redis] url: expected embedded, redis://…, unix://… or redis+sentinel://…, got {redis_url!r}")
    if redis_url.startswith("unix://") and not os.path.isabs(redis_url[len("unix://"):].split("?")[0]):
        redis_url = "unix://" + os.path.normpath(os.path.join(base, redis_url[len("unix://"):]))
    retention_days = _number("state", "retention_days", v["state"]["retention_days"], kind=float)
    if not retention_days > 0 or retention_days == float("inf"):
        raise ConfigError(f"[state] retention_days: must be a number of days above 0 (fractions allowed), "
                          f"got {v['state']['retention_days']!r}")
    prefix = v["redis"]["key_prefix"].strip()
    if not prefix or any(c in prefix for c in " {}\n"):
        raise ConfigError("[redis] key_prefix: must be a plain non-empty word")

    webhook_urls = tuple(v["notify"]["webhook_urls"].split())
    for url in webhook_urls:
        if not url.startswith(("http://", "https://")) or len(url) < 10:
            raise ConfigError(f"[notify] webhook_urls: {url!r} is not an http:// or https:// URL")
    retry_first = _number("notify", "retry_first_seconds", v["notify"]["retry_first_seconds"], kind=float,
                          minimum=0.1)
    if retry_first > 10:
        raise ConfigError("[notify] retry_first_seconds: must be at most 10")

    staging_max = _number("staging", "max_timeout_seconds", v["staging"]["max_timeout_seconds"], kind=float,
                          minimum=1)
    staging_timeout = _number("staging", "timeout_seconds", v["staging"]["timeout_seconds"], kind=float, minimum=1)
    if staging_timeout > staging_max:
        # A default above the operator's maximum would refuse every /submitTransfer without its
        # own staging_timeout: the unset default follows the maximum down; a value set is an error.
        if v["staging"]["timeout_seconds"] != DEFAULTS["staging"]["timeout_seconds"]:
            raise ConfigError(f"[staging] timeout_seconds: {staging_timeout:g} is above "
                              f"[staging] max_timeout_seconds ({staging_max:g})")
        staging_timeout = staging_max

    dts_root, user_root = p("paths", "dts_root"), p("paths", "user_root")
    _separate_roots(dts_root, user_root)

    return Config(
        source=path or "",
        unknown_keys=tuple(v["_unknown"]),
        listen=listen,
        public_url=v["server"]["public_url"].strip().rstrip("/"),
        log_format=log_format,
        redis_url=redis_url,
        redis_timeout=_number("redis", "timeout_seconds", v["redis"]["timeout_seconds"], kind=float, minimum=0.1),
        key_prefix=prefix,
        state_dir=p("state", "dir"),
        retention_seconds=retention_days * 86400,
        dts_root=dts_root,
        user_root=user_root,
        target_subdir=parts,
        delete_source=_bool("paths", "delete_source", v["paths"]["delete_source"]),
        auth_backend=backend,
        tokens_file=p("auth", "tokens_file", required=backend == "tokens"),
        kbase_url=v["auth"]["kbase_url"].strip().rstrip("/"),
        transfer_role=role,
        auth_cache_seconds=_number("auth", "cache_seconds", v["auth"]["cache_seconds"], kind=float),
        auth_timeout=_number("auth", "timeout_seconds", v["auth"]["timeout_seconds"], kind=float, minimum=0.1),
        service_token=service_token,
        users_check=users_check,
        ownership=ownership,
        uid=uid,
        gid=gid,
        threads=_number("copy", "threads", v["copy"]["threads"], minimum=1),
        processes=_processes(v["copy"]["processes"]),
        max_jobs=_number("copy", "max_jobs", v["copy"]["max_jobs"], minimum=1),
        max_payload_bytes=None if gb is None else int(gb * 1024**3),
        checksum=_choice("copy", "checksum", v["copy"]["checksum"], CHECKSUMS),
        fsync=_bool("copy", "fsync", v["copy"]["fsync"]),
        lease_seconds=_number("copy", "lease_seconds", v["copy"]["lease_seconds"], kind=float, minimum=2),
        max_jobs_per_user=per_user,
        reflink=_choice("copy", "reflink", v["copy"]["reflink"], ("auto", "never")),
        stall_seconds=_number("copy", "stall_seconds", v["copy"]["stall_seconds"], kind=float),
        staging_timeout=staging_timeout,
        staging_max_timeout=staging_max,
        watch_enabled=_bool("watch", "enabled", v["watch"]["enabled"]),
        watch_interval=_number("watch", "interval_seconds", v["watch"]["interval_seconds"], kind=float, minimum=0.1),
        watch_settle=_number("watch", "settle_seconds", v["watch"]["settle_seconds"], kind=float),
        drain_grace=_number("drain", "grace_seconds", v["drain"]["grace_seconds"], kind=float),
        read_timeout=read_timeout,
        webhook_urls=webhook_urls,
        webhook_secret=v["notify"]["webhook_secret"].strip(),
        webhook_retry_hours=_number("notify", "retry_hours", v["notify"]["retry_hours"], kind=float, minimum=0),
        webhook_events=_choice("notify", "events", v["notify"]["events"], ("end", "all")),
        webhook_retry_first=retry_first,
    )
