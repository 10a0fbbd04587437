"""`affinity-node` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import uuid
import zipfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from affinity_node.argtypes import (
    concurrency_limit,
    key_id,
    lora_adapter,
    non_empty,
    non_negative_float,
    non_negative_int,
    port,
    positive_float,
    positive_int,
    priority_class,
    requests_limit,
    tokens_limit,
)
from affinity_node.argtypes import (
    dsn as dsn_arg,
)

DSN_ENV = "AFFINITY_DATABASE_DSN"
DSN_FILE_ENV = "AFFINITY_DATABASE_DSN_FILE"
EVENT_LOOP_ENV = "AFFINITY_EVENT_LOOP"

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _add_limits(p: argparse.ArgumentParser) -> None:
    """Fleet-wide per-key limits (0 removes one); with --model, that model's own."""
    p.add_argument("--rpm", type=requests_limit, help="requests a minute (0: no limit)")
    p.add_argument("--tpm", type=tokens_limit, help="tokens a minute (0: no limit)")
    p.add_argument(
        "--max-concurrent", type=concurrency_limit, help="requests at once (0: no limit)"
    )
    p.add_argument(
        "--model", type=non_empty, help="limit this model only (default: every model together)"
    )
    p.add_argument(
        "--priority",
        type=priority_class,
        help="fair-queueing class, 0 (default) to 9: while a model's backends are all "
        "saturated, higher classes leave the queue first (the key's, not a model's)",
    )


def _add_dsn(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dsn",
        type=dsn_arg,
        default=os.environ.get(DSN_ENV),
        help=f"Postgres DSN (default: ${DSN_ENV})",
    )


def _need_dsn(args: argparse.Namespace) -> str:
    """--dsn, else $AFFINITY_DATABASE_DSN, else the file $AFFINITY_DATABASE_DSN_FILE names (a
    mounted Secret: a Job then has no DSN in its spec or its command line)."""
    if not args.dsn and os.environ.get(DSN_FILE_ENV):
        from affinity_node.config import read_dsn_file

        try:
            args.dsn = dsn_arg(read_dsn_file(os.environ[DSN_FILE_ENV]))
        except (OSError, argparse.ArgumentTypeError) as exc:
            raise SystemExit(f"error: {exc}") from None
    if not args.dsn:
        raise SystemExit(f"error: no database: pass --dsn or set {DSN_ENV} or {DSN_FILE_ENV}")
    dsn: str = args.dsn
    return dsn


async def _migrate(args: argparse.Namespace) -> int:
    from affinity_node.store.migrate import LockPolicy, migrate

    policy = LockPolicy(lock_timeout_ms=args.lock_timeout_ms, attempts=args.attempts)
    applied = await migrate(_need_dsn(args), policy=policy)
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


async def _backup(args: argparse.Namespace) -> int:
    return await _backup_or_restore(args, restoring=False)


async def _restore(args: argparse.Namespace) -> int:
    return await _backup_or_restore(args, restoring=True)


async def _backup_or_restore(args: argparse.Namespace, restoring: bool) -> int:
    from affinity_node.store import backup

    conn = await asyncpg.connect(_need_dsn(args))
    try:
        if restoring:
            counts = await backup.restore(conn, Path(args.in_))
        else:
            counts = await backup.backup(conn, Path(args.out))
    except (backup.BackupError, OSError, zipfile.BadZipFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    verb = "restored" if restoring else "wrote"
    print(f"{verb} " + ", ".join(f"{c.table} {c.rows}" for c in counts))
    return 0


async def _keys(args: argparse.Namespace) -> int:
    from affinity_node.store import keys

    conn = await asyncpg.connect(_need_dsn(args))
    try:
        if args.keys_cmd == "create":
            async with conn.transaction():
                key, secret = await keys.create_key(conn, args.name)
                limits = await _set_limits(conn, key.id, args)
            if args.json:
                out = {"id": str(key.id), "name": key.name, "secret": secret}
                print(json.dumps({**out, **_limits_json(limits)}))
            else:
                print(f"id:     {key.id}\nname:   {key.name}\nsecret: {secret}")
                if limits is not None:
                    print(f"limits: {_limits_text(limits)}")
                print("(the secret is shown only once; only its SHA-256 is stored)")
        elif args.keys_cmd == "update":
            return await _update_limits(conn, args)
        elif args.keys_cmd == "list":
            items = await keys.list_keys(conn)
            if args.json:
                print(json.dumps([_key_json(k) for k in items]))
            else:
                for k in items:
                    state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
                    print(f"{k.id}  {k.name:<24}  {state}")
        elif args.keys_cmd == "revoke":
            if not await keys.revoke_key(conn, args.id):
                print(f"no active key {args.id}", file=sys.stderr)
                return 1
            print(f"revoked {args.id}")
        return 0
    finally:
        await conn.close()


async def _set_limits(conn: asyncpg.Connection, key: uuid.UUID, args: argparse.Namespace) -> Any:
    """The limits given on the command line (None when none was)."""
    from affinity_node.store.limits import set_limits

    given = (args.rpm, args.tpm, args.max_concurrent, args.priority)
    if all(v is None for v in given):
        return None
    if args.priority is not None and args.model:
        print(
            "--priority is the key's class on every model: give it without --model", file=sys.stderr
        )
        raise SystemExit(2)
    model = args.model or ""
    return await set_limits(conn, key, model, *given)


async def _update_limits(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from affinity_node.store import keys

    if not any(k.id == args.id and k.revoked_at is None for k in await keys.list_keys(conn)):
        print(f"no active key {args.id}", file=sys.stderr)
        return 1
    limits = await _set_limits(conn, args.id, args)
    if limits is None:
        print(
            "nothing to change: give --rpm, --tpm, --max-concurrent or --priority",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps({"id": str(args.id), **_limits_json(limits)}))
    else:
        print(f"updated {args.id}: {_limits_text(limits)}")
    return 0


def _limits_json(limits: Any) -> dict[str, Any]:
    if limits is None:
        return {}
    return {
        "rpm": limits.rpm,
        "tpm": limits.tpm,
        "max_concurrent": limits.max_concurrent,
        "priority": limits.priority,
    }


def _limits_text(limits: Any) -> str:
    parts = [f"{k}={v}" for k, v in _limits_json(limits).items() if v is not None]
    return " ".join(parts) or "none"


def _key_json(k: Any) -> dict[str, Any]:
    return {
        "id": str(k.id),
        "name": k.name,
        "created_at": k.created_at.isoformat(),
        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
    }


async def _backends(args: argparse.Namespace) -> int:
    from affinity_node import cli_backends

    dsn = _need_dsn(args)
    return await cli_backends.run(args, lambda: asyncpg.connect(dsn))


async def _usage(args: argparse.Namespace) -> int:
    from affinity_node import cli_usage

    dsn = _need_dsn(args)
    return await cli_usage.run(args, lambda: asyncpg.connect(dsn))


async def _bindings(args: argparse.Namespace) -> int:
    from affinity_node.app import database_pool, postgres_bindings
    from affinity_node.config import DatabaseConfig

    db = DatabaseConfig(dsn=_need_dsn(args), pool_max=2)
    async with database_pool(db, "cli") as db_pool:
        store = postgres_bindings(db_pool)
        api_key_id: uuid.UUID | None = args.api_key_id
        if args.bindings_cmd == "list":
            rows = await store.list_bindings(args.model, api_key_id)
            if args.json:
                print(
                    json.dumps(
                        [
                            {
                                "api_key_id": str(r["api_key_id"]),
                                "model": r["model"],
                                "provider_url": r["provider_url"],
                                "fanout_urls": list(r["fanout_urls"]),
                                "version": r["version"],
                                "expires_at": r["expires_at"].isoformat(),
                                "ttl_seconds": round(r["ttl"], 3),
                            }
                            for r in rows
                        ]
                    )
                )
            else:
                for r in rows:
                    more = f" +{len(r['fanout_urls'])}" if r["fanout_urls"] else ""
                    print(
                        f"{r['api_key_id']}  {r['model']:<24}  {r['provider_url'] + more:<36}  "
                        f"v{r['version']}  ttl {r['ttl']:.0f}s"
                    )
        else:
            n = await store.purge(args.model, api_key_id)
            print(f"purged {n} binding(s)")
        return 0


async def _serve(args: argparse.Namespace) -> int:
    from affinity_node.app import serve
    from affinity_node.config import ConfigError, advice, load_config
    from affinity_node.observability.logs import configure_logging

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.logging.level, cfg.logging.json, access=cfg.logging.access)
    for note in advice(cfg):
        logging.getLogger("affinity_node.config").warning("%s", note)
    await serve(cfg, args.config)
    return 0


async def _fake_backend(args: argparse.Namespace) -> int:
    from affinity_node.sim.fake_backend import FakeBackendConfig, serve

    cfg = FakeBackendConfig(
        backend_id=args.id,
        models=args.model,
        host=args.host,
        port=args.port,
        cache_blocks=args.cache_blocks,
        ttft_base_s=args.ttft_base,
        prefill_s_per_token=args.prefill_per_token,
        tokens_per_s=args.tokens_per_s,
        decode_slowdown=args.decode_slowdown,
        output_tokens=args.output_tokens,
        max_running=args.max_running,
        kv_cache_blocks=args.kv_cache_blocks,
        seed=args.seed,
        lora=dict(args.lora),
    )
    running = await serve(cfg)
    print(f"fake backend {args.id} serving {', '.join(args.model)} on {running.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="affinity-node", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run one proxy node")
    p.add_argument("--config", required=True, help="YAML config (env AFFINITY_* overrides)")
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "fake-backend", help="a vLLM simulator with prefix caching and a capacity model"
    )
    p.add_argument("--port", type=port, required=True)
    p.add_argument(
        "--id", type=non_empty, required=True, help="backend id (x-backend-id, system_fingerprint)"
    )
    p.add_argument(
        "--model", type=non_empty, action="append", required=True, help="model name (repeatable)"
    )
    p.add_argument("--host", type=non_empty, default="127.0.0.1")
    p.add_argument(
        "--cache-blocks", type=positive_int, default=2048, help="prefix cache size, 16-token blocks"
    )
    p.add_argument(
        "--ttft-base",
        type=non_negative_float,
        default=0.005,
        help="seconds to the first token besides the prefill (default 0.005)",
    )
    p.add_argument(
        "--prefill-per-token",
        type=non_negative_float,
        default=0.00002,
        help="prefill compute seconds per uncached token, shared by the requests prefilling "
        "at once: k of them each progress at 1/k (default 0.00002)",
    )
    p.add_argument(
        "--tokens-per-s",
        type=positive_float,
        default=2000.0,
        help="output tokens per second of a request decoding alone (default 2000)",
    )
    p.add_argument(
        "--decode-slowdown",
        type=non_negative_float,
        default=0.02,
        help="a decode step lasts (1 + this x (running - 1)) lone steps (default 0.02)",
    )
    p.add_argument("--output-tokens", type=positive_int, default=16)
    p.add_argument(
        "--max-running",
        type=positive_int,
        default=64,
        help="requests running at once; the others wait FIFO (default 64)",
    )
    p.add_argument(
        "--kv-cache-blocks",
        type=positive_int,
        default=None,
        help="KV blocks held by running requests (prompt + output); a request waits until "
        "its blocks fit (default: --cache-blocks)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--lora",
        type=lora_adapter,
        action="append",
        default=[],
        metavar="NAME[=PARENT]",
        help="serve a LoRA adapter, listed in /v1/models with its parent (default: the first "
        "--model); repeatable",
    )
    p.set_defaults(func=_fake_backend)

    p = sub.add_parser("migrate", help="apply db/migrations (safe to run from many nodes)")
    _add_dsn(p)
    p.add_argument(
        "--lock-timeout-ms",
        type=positive_int,
        default=2000,
        help="longest wait of one statement for a table lock before it backs off and retries "
        "(writers queue behind a waiting DDL statement) (default: 2000)",
    )
    p.add_argument(
        "--attempts",
        type=positive_int,
        default=30,
        help="lock waits per file (or statement) before giving up (default: 30)",
    )
    p.set_defaults(func=_migrate)

    p = sub.add_parser(
        "backup", help="export keys, backend registry and usage ledger (not bindings) to a file"
    )
    p.add_argument("--out", required=True, help="the backup file to write (zip)")
    _add_dsn(p)
    p.set_defaults(func=_backup)

    p = sub.add_parser(
        "restore",
        help="replace keys, registry and ledger with a backup's (on a migrated database); "
        "bindings are emptied and every node reloads",
    )
    p.add_argument("--in", dest="in_", required=True, help="a file from `backup`")
    _add_dsn(p)
    p.set_defaults(func=_restore)

    p = sub.add_parser("keys", help="manage API keys")
    ks = p.add_subparsers(dest="keys_cmd", required=True)
    c = ks.add_parser("create", help="create a key; prints its id and secret once")
    c.add_argument("--name", type=non_empty, required=True)
    c.add_argument("--json", action="store_true")
    _add_limits(c)
    _add_dsn(c)
    c = ks.add_parser("update", help="change a key's fleet-wide limits (every node within 1 s)")
    c.add_argument("id", type=key_id, help="the key id (keys list shows it)")
    c.add_argument("--json", action="store_true")
    _add_limits(c)
    _add_dsn(c)
    c = ks.add_parser("list", help="list keys")
    c.add_argument("--json", action="store_true")
    _add_dsn(c)
    c = ks.add_parser("revoke", help="revoke a key (every node refuses it at once)")
    c.add_argument("id", type=key_id, help="the key id (keys list shows it)")
    _add_dsn(c)
    p.set_defaults(func=_keys)

    p = sub.add_parser("bindings", help="inspect or purge (api key, model) bindings")
    bs = p.add_subparsers(dest="bindings_cmd", required=True)
    c = bs.add_parser("list")
    c.add_argument("--model", type=non_empty)
    c.add_argument("--api-key-id", type=key_id)
    c.add_argument("--json", action="store_true")
    _add_dsn(c)
    c = bs.add_parser("purge")
    c.add_argument("--model", type=non_empty)
    c.add_argument("--api-key-id", type=key_id)
    _add_dsn(c)
    p.set_defaults(func=_bindings)

    from affinity_node import cli_backends

    cli_backends.add_parser(sub, _add_dsn)
    sub.choices["backends"].set_defaults(func=_backends)

    from affinity_node import cli_usage

    cli_usage.add_parser(sub, _add_dsn)
    sub.choices["usage"].set_defaults(func=_usage)

    from affinity_node.sim.bench_cli import add_bench_parser
    from affinity_node.sim.chaos import add_chaos_parser
    from affinity_node.sim.demo import add_demo_parser

    add_demo_parser(sub)
    add_bench_parser(sub)
    add_chaos_parser(sub)
    return parser


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (the node serves ~6% more requests per core with it), unless
    AFFINITY_EVENT_LOOP=asyncio asks for the default loop."""
    if os.environ.get(EVENT_LOOP_ENV, "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(func(args))
    except KeyboardInterrupt:
        return 130
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # InterfaceError includes a DSN asyncpg cannot use (ClientConfigurationError).
        print(f"error: {exc}", file=sys.stderr)
        return 1
