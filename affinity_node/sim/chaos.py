"""`affinity-node chaos`: a fleet under multi-tenant load while faults come and go.

Starts Postgres (embedded), 4 fake backends and 3 nodes; a client-side balancer spreads a chat
workload over the ready nodes (as HAProxy with health checks would). The run is cut into
phases, one fault each, applied and healed while the load goes on:

  baseline              nothing broken: what the rest is compared with
  postgres_stopped      pg_ctl stop, then start again
  postgres_frozen       SIGSTOP of every Postgres process, then SIGCONT (a hung host)
  listeners_terminated  pg_terminate_backend of every node's LISTEN session
  backend_killed        SIGKILL of one fake backend, restarted later
  node_killed           SIGKILL of one node, restarted later
  keys_churned          keys revoked and new ones created under load
  hostile_notify        forged payloads on both channels: implausible ones (huge versions, NaN,
                        odd backends) and plausible ones (the next version, a real backend
                        and TTL), forged revocations of live keys, a flood of forged creates
  reader_held           a session LISTENs and holds a transaction open (the NOTIFY queue's
                        tail) while the load notifies, then lets go
  large_answers         non-streamed answers of 300-600 KB (past the upstream client's
                        256 KB pause), each followed at once by a small request on the same
                        node and backend (a reused connection); a request not done in 5 s
                        counts as hung (a failure)
  stalled_reader        a raw socket asks for a 16 MB answer and never reads it: the node must
                        drop it within its write timeout (2 s here), its backend slot free
  token_flood           random bearer tokens at every node

For each phase the report gives: requests; failures a healthy fleet could have served (must be
0: requests in flight on a node or a backend when it was killed are excused); bindings still
split after the phase (a node's cache differing from the table, must be 0); requests of a
revoked key served more than 1 s after its revocation (must be 0); requests served as a hit by
another backend than the table's after a forged binding event (must be 0; a live key refused
counts as a failure); seconds from the heal until
every node's cache equals the table; database statements the token flood caused (must be 0).
Exit status 0 only when every must-be-zero column is zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import asyncpg

from affinity_node.argtypes import dsn as dsn_arg
from affinity_node.argtypes import positive_float, positive_int
from affinity_node.http.ops import pair_fingerprint
from affinity_node.sim.chaos_fleet import (
    CLIENT_WRITE_TIMEOUT_S,
    MODEL,
    Balancer,
    ChaosFleet,
    ChaosPostgres,
    excused_backend,
    excused_node,
)
from affinity_node.sim.chaos_relay import (
    LARGE_ANSWER_BYTES,
    REQUEST_BOUND_S,
    Reply,
    bounded_chat,
    stall_reader,
)
from affinity_node.sim.support import (
    Processes,
    SupportError,
    embedded_postgres,
    scrape_all,
    total,
)

PHASES = (
    "baseline", "postgres_stopped", "postgres_frozen", "listeners_terminated",
    "backend_killed", "node_killed", "keys_churned", "hostile_notify", "reader_held",
    "large_answers", "stalled_reader", "token_flood",
)  # fmt: skip
MIN_PHASE_S = 3.0
"""The stalled reader needs its write timeout (2 s) and a margin inside one phase."""
MUST_BE_ZERO = ("failures", "split", "revoked_late", "flood_statements", "wrong_backend")
FORGED_CREATES = 2000
REVOCATION_GRACE_S = 1.0
CONVERGE_POLL_S = 0.25


@dataclass
class Tenant:
    name: str
    key_id: uuid.UUID
    secret: str
    revoked_at: float | None = None
    usable_from: float = 0.0


@dataclass
class Record:
    start: float
    end: float
    tenant: Tenant
    node: int | None
    status: int
    """HTTP status; 0 when no node answered at all."""
    error: str | None
    backend: str | None = None
    streamed: bool = False
    affinity: str | None = None
    """The node's x-affinity header."""


@dataclass
class PhaseResult:
    name: str
    seconds: float
    requests: int = 0
    failures: int = 0
    excused: int = 0
    revoked_late: int = 0
    split: int = 0
    converge_s: float | None = None
    flood_statements: float | None = None
    wrong_backend: int = 0
    notes: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)


class Load:
    """Workers sending chat requests for the live tenants (and for revoked ones, which must be
    refused), through the balancer; every request is recorded."""

    def __init__(
        self, fleet: ChaosFleet, balancer: Balancer, tenants: list[Tenant], workers: int, seed: int
    ) -> None:
        self.fleet = fleet
        self.balancer = balancer
        self.tenants = tenants
        self.records: list[Record] = []
        self._workers = workers
        self._rng = random.Random(seed)
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(self._workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self, w: int) -> None:
        i = w
        while not self._stop.is_set():
            now = time.monotonic()
            usable = [t for t in self.tenants if t.usable_from <= now]
            tenant = usable[i % len(usable)]
            i += 1
            await self.one(tenant, stream=self._rng.random() < 0.5)
            await asyncio.sleep(0.01)

    async def one(self, tenant: Tenant, stream: bool) -> None:
        body = {
            "model": MODEL,
            "stream": stream,
            "max_tokens": 12,
            "messages": [
                {"role": "system", "content": f"Tenant {tenant.name} rules."},
                {"role": "user", "content": "Say something short."},
            ],
        }
        headers = {"Authorization": f"Bearer {tenant.secret}"}
        start = time.monotonic()
        node: int | None = None
        for node in self.balancer.order():
            url = f"{self.fleet.node_urls[node]}/v1/chat/completions"
            try:
                rec = await self._send(url, body, headers, tenant, node, start, stream)
            except aiohttp.ClientConnectorError:  # refused: this node is down, try the next
                self.balancer.refused(node)
                continue
            self.records.append(rec)
            return
        self.records.append(Record(start, time.monotonic(), tenant, node, 0, "no node answered"))

    async def _send(
        self,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        tenant: Tenant,
        node: int,
        start: float,
        stream: bool,
    ) -> Record:
        session = self.fleet.session
        try:
            async with session.post(
                url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=15)
            ) as r:
                backend = r.headers.get("x-backend-id")
                data = await r.read()
                error = None
                if r.status != 200:
                    error = f"HTTP {r.status}: {data[:120]!r}"
                elif stream and (b'"error"' in data or not data.rstrip().endswith(b"[DONE]")):
                    error = "stream ended with an error"
                return Record(
                    start, time.monotonic(), tenant, node, r.status, error, backend,
                    streamed=stream, affinity=r.headers.get("x-affinity"),
                )  # fmt: skip
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Record(
                start,
                time.monotonic(),
                tenant,
                node,
                0,
                f"{type(exc).__name__}: {exc}",
                None,
                stream,
            )


def classify(rec: Record, fleet: ChaosFleet) -> str:
    """ok | expected_refusal | revoked_late | excused | failure."""
    revoked = rec.tenant.revoked_at
    if revoked is not None and rec.start > revoked + REVOCATION_GRACE_S:
        return "revoked_late" if rec.status == 200 and rec.error is None else "expected_refusal"
    if revoked is not None and rec.status == 401:
        return "expected_refusal"
    if rec.status == 200 and rec.error is None:
        return "ok"
    outages = fleet.outages
    if rec.node is not None and excused_node(outages, rec.node, rec.start, rec.end):
        return "excused"
    if rec.streamed and excused_backend(outages, rec.backend, rec.start, rec.end):
        return "excused"
    return "failure"


async def table_bindings(dsn: str) -> dict[str, str] | None:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        rows = await conn.fetch(
            "SELECT api_key_id, model, provider_url FROM api_key_model_affinity "
            "WHERE expires_at > now()"
        )
    finally:
        await conn.close()
    return {pair_fingerprint(r[0], r[1]): r[2] for r in rows}


async def disagreements(fleet: ChaosFleet, dsn: str) -> int | None:
    """Pairs on which some node's cache differs from the table; None when it cannot tell."""
    table = await table_bindings(dsn)
    if table is None:
        return None
    caches = await fleet.node_bindings()
    if len(caches) < len(fleet.node_ports):
        return None
    bad: set[str] = set()
    for cache in caches.values():
        for pair in set(cache) | set(table):
            if cache.get(pair) != table.get(pair):
                bad.add(pair)
    return len(bad)


class Soak:
    def __init__(
        self,
        args: argparse.Namespace,
        fleet: ChaosFleet,
        pg: ChaosPostgres | None,
        load: Load,
        dsn: str,
        out: Callable[[str], None],
    ) -> None:
        self.args = args
        self.fleet = fleet
        self.pg = pg
        self.load = load
        self.dsn = dsn
        self.say = out
        self.phase_s = args.duration / len(PHASES)
        self.hold_s = self.phase_s * 0.4
        self._rng = random.Random(args.seed)

    async def run(self) -> list[PhaseResult]:
        results = []
        for name in PHASES:
            self.say(f"[chaos] {name} ({self.phase_s:.1f} s)")
            results.append(await self.phase(name))
        return results

    async def phase(self, name: str) -> PhaseResult:
        result = PhaseResult(name, self.phase_s)
        began = time.monotonic()
        first_record = len(self.load.records)
        fault: Callable[[PhaseResult], Awaitable[None]] = getattr(self, f"_{name}")
        await fault(result)
        healed = time.monotonic()
        result.converge_s = await self._converge(began + self.phase_s, healed, result)
        await asyncio.sleep(max(0.0, began + self.phase_s - time.monotonic()))
        split = await disagreements(self.fleet, self.dsn)
        result.split = split if split is not None else -1
        if split is None:
            result.notes.append("could not compare caches with the table at the end")
        for rec in self.load.records[first_record:]:
            kind = classify(rec, self.fleet)
            result.requests += 1
            if kind == "failure":
                result.failures += 1
                if len(result.samples) < 3:
                    result.samples.append(f"node {rec.node}: {rec.error}")
            elif kind == "excused":
                result.excused += 1
            elif kind == "revoked_late":
                result.revoked_late += 1
        return result

    async def _converge(self, deadline: float, healed: float, result: PhaseResult) -> float | None:
        while time.monotonic() < deadline:
            if await disagreements(self.fleet, self.dsn) == 0:
                return time.monotonic() - healed
            await asyncio.sleep(CONVERGE_POLL_S)
        return None

    async def _hold(self) -> None:
        await asyncio.sleep(self.hold_s)

    # -- the faults ----------------------------------------------------------------------------

    async def _baseline(self, result: PhaseResult) -> None:
        await self._hold()

    async def _postgres_stopped(self, result: PhaseResult) -> None:
        if self.pg is None:
            result.notes.append("skipped: the database is external (--dsn)")
            return
        await self.pg.stop()
        await self._hold()
        await self.pg.start()

    async def _postgres_frozen(self, result: PhaseResult) -> None:
        if self.pg is None:
            result.notes.append("skipped: the database is external (--dsn)")
            return
        self.pg.freeze()
        try:
            await self._hold()
        finally:
            self.pg.thaw()

    async def _listeners_terminated(self, result: PhaseResult) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name LIKE 'affinity-node-listener:%'"
            )
        finally:
            await conn.close()
        result.notes.append(f"{killed} listener session(s) terminated")
        await self._hold()

    async def _backend_killed(self, result: PhaseResult) -> None:
        victim = self._rng.randrange(len(self.fleet.backend_ports))
        await self.fleet.kill_backend(victim)
        result.notes.append(f"backend b{victim} killed")
        await self._hold()
        await self.fleet.start_backend(victim)

    async def _node_killed(self, result: PhaseResult) -> None:
        victim = self._rng.randrange(len(self.fleet.node_ports))
        await self.fleet.kill_node(victim)
        result.notes.append(f"node {victim} killed")
        await self._hold()
        await self.fleet.start_node(victim)

    async def _keys_churned(self, result: PhaseResult) -> None:
        from affinity_node.store.keys import create_key, revoke_key

        conn = await asyncpg.connect(self.dsn)
        try:
            live = [t for t in self.load.tenants if t.revoked_at is None]
            for tenant in live[:2]:
                await revoke_key(conn, tenant.key_id)
                tenant.revoked_at = time.monotonic()
            for i in range(2):
                key, secret = await create_key(conn, f"chaos-new-{uuid.uuid4().hex[:6]}-{i}")
                # A client starts using a key a moment after it got it (not within the
                # notification's milliseconds): a second later here.
                self.load.tenants.append(
                    Tenant(key.name, key.id, secret, usable_from=time.monotonic() + 1.0)
                )
        finally:
            await conn.close()
        result.notes.append("2 keys revoked, 2 created")
        await self._hold()

    async def _hostile_notify(self, result: PhaseResult) -> None:
        live = [t for t in self.load.tenants if t.revoked_at is None]
        forged: list[tuple[str, str]] = []
        for tenant in live[:4]:
            base = {
                "op": "update",
                "api_key_id": str(tenant.key_id),
                "model": MODEL,
                "provider_url": self.fleet.backend_urls[0],
                "version": 9 * 10**18,
                "expires_at": "2099-01-01T00:00:00Z",
                "ttl": 60.0,
                "sent_at": time.time(),
            }
            forged += [
                ("affinity_changes", json.dumps(base)),
                ("affinity_changes", json.dumps({**base, "version": 1, "ttl": 1e12})),
                ("affinity_changes", json.dumps({**base, "provider_url": "http://evil:1"})),
                ("affinity_changes", json.dumps({**base, "op": "delete", "version": 2**62})),
                ("affinity_changes", json.dumps(base).replace("60.0", "NaN")),
            ]
        forged += [
            ("api_key_changes", json.dumps({"op": "create", "id": str(uuid.uuid4())})),
            ("api_key_changes", json.dumps({"op": "revoke", "id": str(uuid.uuid4())})),
            ("api_key_changes", "[" * 5000),
            ("affinity_changes", "{" + "x" * 7000),
        ]
        conn = await asyncpg.connect(self.dsn)
        try:
            for channel, payload in forged:
                await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
            bound = await self._forge_plausible(conn, live[:8])
            await self._forge_keys(conn, live[:4])
        finally:
            await conn.close()
        forged_at = time.monotonic()
        result.notes.append(
            f"{len(forged)} implausible, {len(bound)} plausible binding forgeries, "
            f"{min(len(live), 4)} forged revocations of live keys, {FORGED_CREATES} forged creates"
        )
        first_record = len(self.load.records)
        await self._hold()
        result.wrong_backend = self._wrong_backends(bound, forged_at, first_record)

    async def _forge_plausible(
        self, conn: asyncpg.Connection, tenants: Sequence[Tenant]
    ) -> dict[uuid.UUID, str]:
        """For each bound tenant, the event our trigger would send if the pair moved to
        another real backend: the next version, a real TTL, a fresh timestamp. Returns the
        backend id (b<i>) the table holds for each."""
        urls = self.fleet.backend_urls
        bound: dict[uuid.UUID, str] = {}
        for tenant in tenants:
            row = await conn.fetchrow(
                "SELECT provider_url, version, date_part('epoch', expires_at - now()) AS ttl"
                " FROM api_key_model_affinity WHERE api_key_id = $1 AND model = $2",
                tenant.key_id,
                MODEL,
            )
            if row is None or row["provider_url"] not in urls:
                continue
            other = next(u for u in urls if u != row["provider_url"])
            event = {
                "op": "update", "api_key_id": str(tenant.key_id), "model": MODEL,
                "provider_url": other, "version": row["version"] + 1, "ttl": row["ttl"],
                "sent_at": time.time(), "expires_at": "2099-01-01T00:00:00Z",
            }  # fmt: skip
            await conn.execute("SELECT pg_notify('affinity_changes', $1)", json.dumps(event))
            bound[tenant.key_id] = f"b{urls.index(row['provider_url'])}"
        return bound

    async def _forge_keys(self, conn: asyncpg.Connection, tenants: Sequence[Tenant]) -> None:
        """Revocations of live keys (nobody revoked them), then a flood of creates for keys
        that do not exist, in one transaction."""
        for tenant in tenants:
            payload = json.dumps({"op": "revoke", "id": str(tenant.key_id)})
            await conn.execute("SELECT pg_notify('api_key_changes', $1)", payload)
        await conn.execute(
            "SELECT pg_notify('api_key_changes', json_build_object('op', 'create', 'id',"
            " gen_random_uuid())::text) FROM generate_series(1, $1)",
            FORGED_CREATES,
        )

    def _wrong_backends(self, bound: dict[uuid.UUID, str], after: float, first: int) -> int:
        """Hits served after the forgeries by another backend than the table's (the table
        did not change meanwhile: nothing else is broken in this phase)."""
        return sum(
            1
            for rec in self.load.records[first:]
            if rec.start >= after
            and rec.affinity == "hit"
            and rec.tenant.key_id in bound
            and rec.backend != bound[rec.tenant.key_id]
        )

    async def _token_flood(self, result: PhaseResult) -> None:
        fleet = self.fleet
        urls = {f"node-{i}": f"{u}/metrics" for i, u in enumerate(fleet.node_urls)}
        before = await scrape_all(fleet.session, urls)
        deadline = time.monotonic() + self.hold_s
        sent = 0

        async def flood(w: int) -> None:
            nonlocal sent
            while time.monotonic() < deadline:
                token = "sk-" + hashlib.sha256(f"{w}-{sent}-{random.random()}".encode()).hexdigest()
                url = fleet.node_urls[sent % len(fleet.node_urls)]
                sent += 1
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with fleet.session.get(
                        f"{url}/v1/models",
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as r:
                        await r.read()

        await asyncio.gather(*(flood(w) for w in range(8)))
        after = await scrape_all(fleet.session, urls)
        result.flood_statements = sum(
            total(after[n], "affinity_key_lookups_total", reason="unknown")
            - total(before[n], "affinity_key_lookups_total", reason="unknown")
            for n in urls
        )
        result.notes.append(f"{sent} random tokens")

    async def _reader_held(self, result: PhaseResult) -> None:
        """A dashboard-like session stuck in a transaction: Postgres cannot trim the NOTIFY queue
        past it, and the fleet must not notice (issue 21)."""
        reader = await asyncpg.connect(self.dsn)
        try:
            await reader.execute("LISTEN affinity_changes")
            await reader.execute("BEGIN")
            await reader.fetchval("SELECT 1")
            await self._hold()
            async with self.fleet.session.get(f"{self.fleet.node_urls[0]}/metrics") as r:
                text = await r.text()
            usage = next(
                (ln.split()[-1] for ln in text.splitlines()
                 if ln.startswith("affinity_notify_queue_usage ")),
                "absent",
            )  # fmt: skip
            result.notes.append(f"reader held {self.hold_s:.1f} s; queue usage {usage}")
        finally:
            await reader.close()

    # -- relay faults (issue 21): large answers, a reader that stalls ---------------------------

    def _live(self) -> list[Tenant]:
        now = time.monotonic()
        return [t for t in self.load.tenants if t.revoked_at is None and t.usable_from <= now]

    async def _bounded(self, tenant: Tenant, node: int, pad: int) -> Reply:
        """One non-streamed request with a bound, recorded like the load's requests."""
        start = time.monotonic()
        url = self.fleet.node_urls[node]
        reply = await bounded_chat(self.fleet.session, url, tenant.name, tenant.secret, pad)
        self.load.records.append(
            Record(start, time.monotonic(), tenant, node, reply.status, reply.error, reply.backend)
        )
        return reply

    async def _large_answers(self, result: PhaseResult) -> None:
        """Answers past the 256 KB at which the node's upstream client pauses reading, each
        followed at once by a small request of the same tenant on the same node: that one
        reuses the pooled connection to the same backend, which must not be left paused."""
        deadline = time.monotonic() + self.hold_s
        large: list[Reply] = []
        small: list[Reply] = []

        async def lane(k: int, lanes: int) -> None:
            i = k
            while time.monotonic() < deadline:
                live = self._live()
                tenant, node = live[i % len(live)], self.load.balancer.order()[0]
                i += lanes
                large.append(
                    await self._bounded(tenant, node, self._rng.randint(*LARGE_ANSWER_BYTES))
                )
                small.append(await self._bounded(tenant, node, 0))

        await asyncio.gather(*(lane(k, 4) for k in range(4)))
        hung = sum(1 for r in large + small if r.error is not None and r.error.startswith("hung"))
        slowest = max((r.seconds for r in large), default=0.0)
        result.notes.append(
            f"{len(large)} answers of 300-600 KB + {len(small)} small ones after them on the "
            f"same node; {hung} hung past {REQUEST_BOUND_S:g} s; slowest large {slowest:.2f} s"
        )

    async def _stalled_reader(self, result: PhaseResult) -> None:
        """A client that asks for a 16 MB answer and never reads it: the node drops it after
        its write timeout; meanwhile the same tenant is served on the same node."""
        tenant = self._live()[0]
        node = self.load.balancer.order()[0]
        pid = self.fleet.node_children[node].proc.pid
        backend_urls = {f"b{i}": u for i, u in enumerate(self.fleet.backend_urls)}
        during: list[Reply] = []

        async def meanwhile() -> None:
            for _ in range(5):
                during.append(await self._bounded(tenant, node, 0))

        stall = await stall_reader(
            self.fleet.session,
            self.fleet.node_urls[node],
            pid,
            tenant.name,
            tenant.secret,
            CLIENT_WRITE_TIMEOUT_S,
            backend_urls,
            meanwhile,
        )
        closed = "no" if stall.closed_after_s is None else f"after {stall.closed_after_s:.2f} s"
        result.notes.append(
            f"stalled reader on node {node} (answer {stall.status} from {stall.backend}): "
            f"closed by the node {closed} (bound {stall.bound_s:.2f} s); backend slot free "
            f"while stalled: {'yes' if stall.slot_free else 'no'}; 499s counted: "
            f"{stall.dropped_counted:g}; same tenant served meanwhile: "
            f"{sum(r.error is None for r in during)}/{len(during)}"
        )
        if stall.error or stall.status != 200 or stall.closed_after_s is None:
            result.failures += 1
            result.samples.append(f"stalled reader: {stall.error or 'not dropped in time'}")
        if not stall.slot_free:
            result.failures += 1
            result.samples.append("stalled reader: its backend slot was never seen free")


def render(results: Sequence[PhaseResult], duration: float) -> str:
    head = (
        f"{'fault':<22}{'secs':>6}{'requests':>10}{'failures':>10}{'excused':>9}"
        f"{'split':>7}{'revoked>1s':>12}{'converge s':>12}{'flood stmts':>13}{'wrong be':>10}"
    )
    lines = [f"chaos soak: {duration:g} s, {len(results)} phases", head, "-" * len(head)]
    for r in results:
        conv = "-" if r.converge_s is None else f"{r.converge_s:.2f}"
        flood = "-" if r.flood_statements is None else f"{r.flood_statements:.0f}"
        lines.append(
            f"{r.name:<22}{r.seconds:>6.1f}{r.requests:>10}{r.failures:>10}"
            f"{r.excused:>9}{r.split:>7}{r.revoked_late:>12}{conv:>12}{flood:>13}"
            f"{r.wrong_backend:>10}"
        )
    notes = [
        f"  {r.name}: {'; '.join(r.notes + r.samples)}" for r in results if r.notes or r.samples
    ]
    if notes:
        lines += ["", "notes:", *notes]
    lines += [
        "",
        "failures = requests a healthy fleet could have served that failed "
        "(in flight on a killed node or backend: excused); split = pairs where a node's "
        "cache differs from the table at the phase's end; converge s = from the heal "
        "until every cache equals the table ('-': not within the phase); wrong be = hits "
        "served by another backend than the table's after a forged binding event",
    ]
    return "\n".join(lines)


def passed(results: Sequence[PhaseResult]) -> bool:
    return all(
        r.failures == 0
        and r.split == 0
        and r.revoked_late == 0
        and (r.flood_statements or 0) == 0
        and r.wrong_backend == 0
        for r in results
    )


async def _run(args: argparse.Namespace, out: IO[str]) -> int:
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="affinity-chaos-")))
        pg: ChaosPostgres | None = None
        if args.dsn:
            dsn = args.dsn
        else:
            say("[chaos] starting an embedded Postgres ...")
            pg = ChaosPostgres(stack.enter_context(embedded_postgres()))
            dsn = pg.dsn
        from affinity_node.store.keys import create_key
        from affinity_node.store.migrate import migrate

        await migrate(dsn)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        procs = Processes(Path(args.log_dir) if args.log_dir else tmp)
        stack.push_async_callback(procs.close)
        fleet = ChaosFleet(procs, session, tmp, dsn, backends=4, nodes=3)
        run_id = uuid.uuid4().hex[:6]
        conn = await asyncpg.connect(dsn)
        tenants = []
        for i in range(args.tenants):
            key, secret = await create_key(conn, f"chaos-{run_id}-{i:02d}")
            tenants.append(Tenant(key.name, key.id, secret))
        await conn.close()
        say("[chaos] starting 4 backends and 3 nodes ...")
        for i in range(4):
            await fleet.start_backend(i)
        await asyncio.gather(*(fleet.start_node(i) for i in range(3)))
        balancer = Balancer(fleet)
        balancer.start()
        stack.push_async_callback(balancer.stop)
        load = Load(fleet, balancer, tenants, args.workers, args.seed)
        load.start()
        stack.push_async_callback(load.stop)
        results = await Soak(args, fleet, pg, load, dsn, say).run()
        await load.stop()
        text = render(results, args.duration)
        if args.json:
            say(text)
            print(json.dumps([r.__dict__ for r in results], indent=2), file=out)
        else:
            print(text, file=out, flush=True)
        return 0 if passed(results) else 1
    raise AssertionError("unreachable")  # pragma: no cover


async def run_chaos(args: argparse.Namespace) -> int:
    if args.duration < MIN_PHASE_S * len(PHASES):
        print(
            f"error: --duration must be at least {MIN_PHASE_S * len(PHASES):g} seconds "
            f"({len(PHASES)} phases of {MIN_PHASE_S:g} s)",
            file=sys.stderr,
        )
        return 2
    try:
        return await _run(args, sys.stdout)
    except (SupportError, OSError, asyncpg.PostgresError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def add_chaos_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "chaos",
        help="a fleet under load while faults come and go; prints what it cost",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument(
        "--duration",
        type=positive_float,
        default=60.0,
        help=f"seconds in all, split over the {len(PHASES)} phases (default 60)",
    )
    p.add_argument(
        "--tenants", type=positive_int, default=12, help="API keys under load (default 12)"
    )
    p.add_argument("--workers", type=positive_int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--dsn",
        type=dsn_arg,
        default=None,
        help="an external Postgres (then it cannot be stopped or frozen: those "
        "phases are skipped); default: an embedded one",
    )
    p.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    p.add_argument("--log-dir", metavar="DIR", help="keep the processes' logs here")
    p.set_defaults(func=run_chaos)
