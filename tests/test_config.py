"""The configuration file: defaults, relative paths, environment overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtsbridge import config
from dtsbridge.model import Job, Status, can_move

SPEC_EXAMPLE = """\
[server]
listen = tcp:8080:interface=127.0.0.1   ; a Twisted server endpoint string
[redis]
url = embedded
[state]
dir = ../var/state
[paths]
dts_root = ../var/dts        ; DTS drops one folder per transfer here
user_root = ../var/users     ; a user's datastore is user_root/<username>
target_subdir =              ; empty: the user's root; e.g. dts_transfers
delete_source = false        ; remove the DTS folder after success
[auth]
backend = tokens             ; tokens | kbase
tokens_file = tokens.ini
kbase_url = https://kbase.us/services/auth
transfer_role = DTS_TRANSFER
[users]
check = directory            ; directory | kbase | passwd
[ownership]
mode = none                  ; none | fixed | passwd
uid =
gid =
[copy]
threads = 4
max_jobs = 4                 ; jobs copying at once in one process
max_payload_gb =             ; empty: no limit; a larger folder gets 413
"""


def write(tmp_path: Path, text: str) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    p = etc / "dtsbridge.ini"
    p.write_text(text)
    return p


def test_spec_example_parses_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    c = config.load(str(write(tmp_path, SPEC_EXAMPLE)), environ={})
    assert c.listen == "tcp:8080:interface=127.0.0.1"
    assert c.redis_url == "embedded"
    assert c.dts_root == str(tmp_path / "var" / "dts")
    assert c.user_root == str(tmp_path / "var" / "users")
    assert c.state_dir == str(tmp_path / "var" / "state")
    assert c.tokens_file == str(tmp_path / "etc" / "tokens.ini")
    assert c.target_subdir == ()
    assert c.delete_source is False
    assert (c.auth_backend, c.users_check, c.ownership) == ("tokens", "directory", "none")
    assert (c.uid, c.gid, c.max_payload_bytes) == (None, None, None)
    assert (c.threads, c.max_jobs, c.transfer_role) == (4, 4, "DTS_TRANSFER")
    assert c.unknown_keys == ()


def test_shipped_config_loads() -> None:
    c = config.load(str(Path(__file__).resolve().parent.parent / "etc" / "dtsbridge.ini"), environ={})
    assert c.redis_url == "embedded" and c.checksum == "xxh3" and c.fsync is True
    assert c.reflink == "auto"
    assert config.load(None, environ={"DTSBRIDGE_COPY_REFLINK": "Never"}).reflink == "never"


def test_environment_overrides_every_key_and_command_line_wins(tmp_path: Path) -> None:
    p = write(tmp_path, SPEC_EXAMPLE)
    env = {"DTSBRIDGE_COPY_MAX_JOBS": "9", "DTSBRIDGE_PATHS_TARGET_SUBDIR": "dts_transfers/in",
           "DTSBRIDGE_REDIS_URL": "redis://127.0.0.1:7000/0", "DTSBRIDGE_COPY_MAX_PAYLOAD_GB": "0.5",
           "DTSBRIDGE_OWNERSHIP_MODE": "fixed", "DTSBRIDGE_OWNERSHIP_UID": "1000", "DTSBRIDGE_OWNERSHIP_GID": "100"}
    c = config.load(str(p), environ=env)
    assert c.max_jobs == 9
    assert c.target_subdir == ("dts_transfers", "in")
    assert c.redis_url == "redis://127.0.0.1:7000/0"
    assert c.max_payload_bytes == int(0.5 * 1024**3)
    assert (c.ownership, c.uid, c.gid) == ("fixed", 1000, 100)
    c = config.load(str(p), {"redis": {"url": "unix:///run/r.sock"}, "server": {"listen": "tcp:0"}}, environ=env)
    assert c.redis_url == "unix:///run/r.sock" and c.listen == "tcp:0"


def test_unknown_keys_are_reported_not_fatal(tmp_path: Path) -> None:
    # SPEC_EXAMPLE ends inside [copy]: add a misspelt key there, then a section nobody knows
    c = config.load(str(write(tmp_path, SPEC_EXAMPLE + "threds = 3\n[extra]\nx = 1\n")), environ={})
    assert "[copy] threds" in c.unknown_keys and "[extra]" in c.unknown_keys


@pytest.mark.parametrize("section,key,value,message", [
    ("copy", "threads", "many", "[copy] threads: expected a number"),
    ("copy", "max_jobs", "0", "[copy] max_jobs: must be at least 1"),
    ("paths", "delete_source", "perhaps", "[paths] delete_source: expected true or false"),
    ("auth", "backend", "ldap", "[auth] backend: expected one of tokens, kbase"),
    ("users", "check", "guess", "[users] check: expected one of"),
    ("ownership", "mode", "fixed", "[ownership] uid: mode = fixed needs both uid and gid"),
    ("paths", "target_subdir", "../escape", "[paths] target_subdir"),
    ("redis", "url", "http://x", "[redis] url"),
    ("copy", "checksum", "crc32", "[copy] checksum"),
    ("copy", "reflink", "always", "[copy] reflink: expected one of auto, never"),
])
def test_bad_values_name_the_key(tmp_path: Path, section: str, key: str, value: str, message: str) -> None:
    env = {f"DTSBRIDGE_{section.upper()}_{key.upper()}": value}
    with pytest.raises(config.ConfigError) as e:
        config.load(str(write(tmp_path, SPEC_EXAMPLE)), environ=env)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_kbase_user_check_needs_a_service_token(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"\[auth\] service_token"):
        config.load(str(write(tmp_path, SPEC_EXAMPLE)), environ={"DTSBRIDGE_USERS_CHECK": "kbase"})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="nope.ini"):
        config.load(str(tmp_path / "nope.ini"), environ={})


def test_state_machine_allows_only_forward_moves() -> None:
    assert can_move(Status.STAGING, Status.SUBMITTED)
    assert can_move(Status.SUBMITTED, Status.TRANSFERRING)
    assert can_move(Status.TRANSFERRING, Status.SUBMITTED)  # handed back to the queue
    for final in (Status.SUCCESS, Status.ERROR, Status.CANCELLED):
        assert final.final
        assert not any(can_move(final, s) for s in Status)
    assert not can_move(Status.SUBMITTED, Status.STAGING)


def test_public_view_hides_secrets_and_nulls() -> None:
    job = Job.from_hash("j1", {"status": "TRANSFERRING", "target_user": "alice", "authcode_hash": "x" * 64,
                               "claim": "tok", "lease_host": "h:1", "files_done": "3", "publish_ino": "7",
                               "stager_success": "1", "time_transferring": "2026-11-25T00:00:00.000Z"})
    view = job.public()
    assert view["job_id"] == "j1" and view["status"] == "TRANSFERRING" and view["files_done"] == 3
    assert view["stager_success"] is True
    for secret in ("authcode_hash", "claim", "lease_host", "publish_ino"):
        assert secret not in view
    assert "path" not in view and "reason" not in view


@pytest.mark.parametrize("dts,users,message", [
    ("area", "area/users", "user_root {users} is inside dts_root {dts}"),
    ("area", "area", "both are {dts}"),
    ("area/users/dts", "area/users", "dts_root {dts} is inside user_root {users}"),
    ("area/./x/..", "area/link", "both are {dts}"),  # a link to dts_root is the same folder
])
def test_overlapping_roots_are_refused_naming_the_keys(tmp_path: Path, dts: str, users: str, message: str) -> None:
    (tmp_path / "area" / "users" / "dts").mkdir(parents=True)
    (tmp_path / "area" / "link").symlink_to(tmp_path / "area")
    env = {"DTSBRIDGE_PATHS_DTS_ROOT": str(tmp_path / dts), "DTSBRIDGE_PATHS_USER_ROOT": str(tmp_path / users)}
    with pytest.raises(config.ConfigError) as e:
        config.load(str(write(tmp_path, SPEC_EXAMPLE)), environ=env)
    real = {"dts": str((tmp_path / dts).resolve()), "users": str((tmp_path / users).resolve())}
    assert str(e.value).startswith("[paths] dts_root, user_root: "), e.value
    assert message.format(**real) in str(e.value) and "\n" not in str(e.value)
    # separate folders, even sharing a prefix of their names, are fine
    env = {"DTSBRIDGE_PATHS_DTS_ROOT": str(tmp_path / "area" / "dts"),
           "DTSBRIDGE_PATHS_USER_ROOT": str(tmp_path / "area" / "dts-users")}
    assert config.load(str(write(tmp_path, SPEC_EXAMPLE)), environ=env).user_root.endswith("dts-users")


def test_staging_default_follows_a_lower_maximum_and_a_contradiction_stops(tmp_path: Path) -> None:
    # Only the maximum set (as tests/test_fuzz.py does): the 86400 s default would refuse every
    # /submitTransfer that gives no staging_timeout of its own, so it follows the maximum down.
    path = str(write(tmp_path, SPEC_EXAMPLE + "[staging]\nmax_timeout_seconds = 3600\n"))
    c = config.load(path, environ={})
    assert (c.staging_timeout, c.staging_max_timeout) == (3600, 3600)
    # Both set, the default above the maximum: the operator's contradiction stops startup.
    path = str(write(tmp_path, SPEC_EXAMPLE + "[staging]\ntimeout_seconds = 7200\nmax_timeout_seconds = 3600\n"))
    with pytest.raises(config.ConfigError, match=r"\[staging\] timeout_seconds: 7200 is above"):
        config.load(path, environ={})
    # Below the maximum, both stand as given.
    path = str(write(tmp_path, SPEC_EXAMPLE + "[staging]\ntimeout_seconds = 60\nmax_timeout_seconds = 3600\n"))
    c = config.load(path, environ={})
    assert (c.staging_timeout, c.staging_max_timeout) == (60, 3600)
