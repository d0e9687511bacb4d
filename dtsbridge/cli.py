"""``dtsbridge``: the operator's command.

- ``dtsbridge token new NAME [--user U] [--roles R,…]``: print a new token and its tokens-file section
- ``dtsbridge demo [--config etc/dtsbridge.ini]``: make demo folders and a demo token for a first run
- ``dtsbridge status JOB``: a job's state (a progress bar while it runs, with ``--follow``)
- ``dtsbridge list [--user U] [--status S]``: recent jobs
- ``dtsbridge cancel JOB``: cancel a job
- ``dtsbridge events [--follow] [--since ID] [--user U] [--job JOB]``: job events (``GET /events``)

The last four talk to a running service over HTTP: ``--url`` (or
``DTSBRIDGE_URL``, default ``http://127.0.0.1:8080``) and ``--token`` (or
``DTSBRIDGE_TOKEN``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from dtsbridge.tokenfile import new_token
from dtsbridge.model import FINAL, Status

#: The statuses a job ends in, as the API spells them.
_FINAL = frozenset(s.value for s in FINAL)


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    url = args.url.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if args.token:
        req.add_header("Authorization", args.token)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {"error": {"message": e.reason}}
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"dtsbridge: cannot reach {url}: {getattr(e, 'reason', e)}")


def _fail(code: int, body: Any) -> int:
    msg = body.get("error", {}).get("message", body) if isinstance(body, dict) else body
    print(f"dtsbridge: HTTP {code}: {msg}", file=sys.stderr)
    return 1


def _bar(done: int, total: int | None, width: int = 30) -> str:
    if not total:
        return "[" + " " * width + "]   ?%"
    frac = min(1.0, done / total)
    filled = int(frac * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {frac * 100:5.1f}%"


def cmd_status(args: argparse.Namespace) -> int:
    while True:
        code, body = _request(args, "GET", "/transferStatus?" + urllib.parse.urlencode({"job_id": args.job}))
        if code != 200:
            return _fail(code, body)
        status = body.get("status")
        if args.json:
            print(json.dumps(body, indent=2))
        final = status in _FINAL
        if not args.json:
            if status == Status.TRANSFERRING.value or (args.follow and not final):
                line = (f"{args.job}  {status:<12} {_bar(body.get('bytes_done', 0), body.get('bytes_total'))}  "
                        f"{body.get('files_done', 0)}/{body.get('files_total', '?')} files  "
                        f"{body.get('detailed_status', '')}")
                end = "\r" if (args.follow and not final and sys.stdout.isatty()) else "\n"
                print(line[:200], end=end, flush=True)
            else:
                for k in sorted(body):
                    print(f"{k:>18}: {body[k]}")
        if final or not args.follow:
            if args.follow and sys.stdout.isatty():
                print()
            return 0 if status != Status.ERROR.value else 2
        time.sleep(args.interval)


def cmd_list(args: argparse.Namespace) -> int:
    q = {k: v for k, v in (("user", args.user), ("status", args.status), ("limit", args.limit)) if v}
    code, body = _request(args, "GET", "/jobs?" + urllib.parse.urlencode(q))
    if code != 200:
        return _fail(code, body)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(f"{'JOB':36}  {'STATUS':12}  {'USER':16}  {'FILES':>7}  {'BYTES':>14}  PATH / REASON")
    for j in body.get("jobs", []):
        tail = j.get("path") or j.get("reason") or j.get("subdirectory", "")
        print(f"{j['job_id']:36}  {j['status']:12}  {j.get('target_user', ''):16}  "
              f"{j.get('files_total', ''):>7}  {j.get('bytes_total', ''):>14}  {tail}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    code, body = _request(args, "POST", "/cancelTransfer", {"job_id": args.job})
    if code != 200:
        return _fail(code, body)
    print(f"{args.job}: {body.get('status')}")
    return 0


def _event_line(event_id: str, job: dict[str, Any]) -> str:
    status = job.get("status", "?")
    if status == Status.TRANSFERRING.value and job.get("bytes_total"):
        progress = _bar(job.get("bytes_done", 0), job.get("bytes_total"), width=20)
    else:
        progress = job.get("path") or job.get("reason") or ""
    return (f"{event_id:<16} {job.get('job_id', '?')}  {status:<12} {job.get('target_user', ''):<12} "
            f"{progress}  {job.get('detailed_status', '')}")[:240]


def cmd_events(args: argparse.Namespace) -> int:
    """Print job events as they come: the stored ones after --since, then (with --follow) live ones."""
    q = {k: v for k, v in (("user", args.user), ("job_id", args.job)) if v}
    since = args.since if args.since is not None else (None if args.follow else "0")
    if since is not None:
        q["last_event_id"] = since
    url = args.url.rstrip("/") + "/events" + ("?" + urllib.parse.urlencode(q) if q else "")
    req = urllib.request.Request(url, headers={"Accept": "text/event-stream"})
    if args.token:
        req.add_header("Authorization", args.token)
    try:
        # the service sends a comment line every 15 s: a longer read timeout means it is gone
        resp = urllib.request.urlopen(req, timeout=max(args.timeout, 45))
    except urllib.error.HTTPError as e:
        try:
            return _fail(e.code, json.loads(e.read() or b"{}"))
        except ValueError:
            return _fail(e.code, {"error": {"message": e.reason}})
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"dtsbridge: cannot reach {url}: {getattr(e, 'reason', e)}")
    event: dict[str, str] = {}
    try:
        with resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith(":"):
                    if line[1:].strip() == "live" and not args.follow:
                        return 0
                    continue
                if line:
                    k, _, v = line.partition(":")
                    event[k] = v[1:] if v.startswith(" ") else v
                    continue
                if "data" not in event:
                    event = {}
                    continue
                job = json.loads(event["data"])
                print(json.dumps({"id": event.get("id"), "job": job}) if args.json
                      else _event_line(event.get("id", "-"), job), flush=True)
                if args.job and args.follow and job.get("status") in _FINAL:
                    return 0
                event = {}
    except KeyboardInterrupt:
        return 0
    except (OSError, ValueError) as e:
        print(f"dtsbridge: the event stream broke: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_token_new(args: argparse.Namespace) -> int:
    roles = [r for r in args.roles.replace(",", " ").split() if r]
    token, section = new_token(args.name, args.user or args.name, roles)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write("\n" + section)
        print(f"# appended section [{args.name}] to {args.append}", file=sys.stderr)
    else:
        print(section, end="")
    print(f"# token for [{args.name}] (shown once; only its hash is stored):", file=sys.stderr)
    print(token if args.append else f"# {token}", file=sys.stdout if args.append else sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Folders, a user and a token for a first run of etc/dtsbridge.ini."""
    from dtsbridge import config as configmod
    cfg = configmod.load(args.config)
    os.makedirs(cfg.state_dir, exist_ok=True)
    demo = os.path.join(cfg.dts_root, "demo_transfer")
    os.makedirs(os.path.join(demo, "reads"), exist_ok=True)
    with open(os.path.join(demo, "README.txt"), "w") as f:
        f.write("A demo transfer for dtsbridge.\n")
    with open(os.path.join(demo, "reads", "sample.fastq"), "wb") as f:
        f.write(os.urandom(256 * 1024))
    os.makedirs(os.path.join(cfg.user_root, "alice"), exist_ok=True)
    token, section = new_token("demo", "dts", [cfg.transfer_role])
    if cfg.auth_backend == "tokens":
        existing = open(cfg.tokens_file).read() if os.path.exists(cfg.tokens_file) else ""
        if "[demo]" in existing:
            # replace the old demo section: tokens are shown once, so make a new one
            import configparser
            cp = configparser.ConfigParser(interpolation=None)
            cp.read_string(existing)
            cp.remove_section("demo")
            with open(cfg.tokens_file, "w") as f:
                cp.write(f)
        with open(cfg.tokens_file, "a", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write("\n" + section)
    host = cfg.listen.split(":")
    port = host[1] if len(host) > 1 and host[1].isdigit() else "8080"
    print(f"demo folders: {demo} -> {os.path.join(cfg.user_root, 'alice')}")
    print(f"demo token (section [demo] in {cfg.tokens_file}):\n  {token}\n")
    print("try, once the service runs:")
    print(f"  curl -s -H 'Authorization: {token}' -d target_user=alice -d subdirectory=demo_transfer "
          f"http://127.0.0.1:{port}/complete_transfer")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dtsbridge", description="Operate a dtsbridge service.")
    p.add_argument("--url", default=os.environ.get("DTSBRIDGE_URL", "http://127.0.0.1:8080"))
    p.add_argument("--token", default=os.environ.get("DTSBRIDGE_TOKEN"))
    p.add_argument("--timeout", type=float, default=30)
    sub = p.add_subparsers(dest="cmd", required=True)

    tok = sub.add_parser("token", help="tokens for the tokens file").add_subparsers(dest="tcmd", required=True)
    tn = tok.add_parser("new", help="print a new token and its tokens-file section")
    tn.add_argument("name", help="the section name, e.g. dts")
    tn.add_argument("--user", help="the identity (default: NAME)")
    tn.add_argument("--roles", default="DTS_TRANSFER", help="comma-separated roles (default DTS_TRANSFER)")
    tn.add_argument("--append", metavar="FILE", help="append the section to FILE and print only the token")
    tn.set_defaults(func=cmd_token_new)

    d = sub.add_parser("demo", help="make demo folders and a demo token")
    d.add_argument("--config", default="etc/dtsbridge.ini")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("status", help="a job's state")
    s.add_argument("job")
    s.add_argument("--follow", "-f", action="store_true", help="poll until the job ends")
    s.add_argument("--interval", type=float, default=1.0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    li = sub.add_parser("list", help="recent jobs")
    li.add_argument("--user")
    li.add_argument("--status")
    li.add_argument("--limit", type=int)
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_list)

    c = sub.add_parser("cancel", help="cancel a job")
    c.add_argument("job")
    c.set_defaults(func=cmd_cancel)

    ev = sub.add_parser("events", help="job events: the kept ones, then live ones with --follow")
    ev.add_argument("--follow", "-f", action="store_true",
                    help="keep printing events as they come (with --job: until the job ends)")
    ev.add_argument("--since", metavar="ID",
                    help="start after this event id (default: all kept events; with --follow: the next change)")
    ev.add_argument("--user")
    ev.add_argument("--job", metavar="JOB_ID")
    ev.add_argument("--json", action="store_true", help="one JSON object per event")
    ev.set_defaults(func=cmd_events)

    args = p.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
