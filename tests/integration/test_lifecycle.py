"""The backend registry across real nodes: a drain given on the command line reaches every node
within a second, nothing new lands on a draining backend, its bindings move off at the fleet's
pace whatever the number of nodes, `backends list` says when it is drained; backends added and
removed at runtime; rebalance after a scale-up converges and stops; DNS discovery; hosts outside
`backends.allow` are never used, and `backends list` sends nothing to registry URLs."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import asyncpg
import openai

from affinity_node.app import run_node
from affinity_node.config import BackendConfig, HostAllowList, NodeConfig
from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from tests.integration.test_cli import cli
from tests.support.cluster import MODEL, cluster, key_everywhere, node_config
from tests.support.waiting import wait_for


class ConnectionCounter:
    """A loopback listener that counts the connections made to it (and answers none)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int = 0) -> str:
        async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            w.close()

        self.server = await asyncio.start_server(accept, host, port)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://{host}:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def registry_add(dsn: str, url: str) -> None:
    """A registry row written straight into the table (as any admin, or an attacker, could)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO affinity_backends (url, added, models) VALUES ($1, true, $2)", url, [MODEL]
        )
    finally:
        await conn.close()


MESSAGES = [{"role": "user", "content": "hi"}]


async def bound_counts(dsn: str) -> Counter[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT provider_url FROM api_key_model_affinity WHERE expires_at > now()"
        )
    finally:
        await conn.close()
    return Counter(r[0] for r in rows)


async def bind_tenants(c, n: int) -> list[str]:
    secrets = [await c.new_key(f"t{i}") for i in range(n)]
    for i, secret in enumerate(secrets):
        await c.client(i % len(c.nodes), secret).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2
        )
    return secrets


def paced(rate: float):
    def configure(cfg: NodeConfig) -> None:
        cfg.drain.moves_per_second = rate
        cfg.rebalance.enabled = False

    return configure


async def test_a_drain_reaches_every_node_within_a_second_and_moves_at_the_fleets_pace(dsn):
    rate = 4.0
    async with cluster(dsn, nodes=3, backends=3, configure=paced(rate)) as c:
        await bind_tenants(c, 12)
        counts = await bound_counts(dsn)
        victim, held = counts.most_common(1)[0]
        assert held >= 3
        code, out, err = await cli("backends", "drain", victim, dsn=dsn)
        assert code == 0, err
        drained_at = time.monotonic()
        took = await wait_for(
            lambda: all(n.backends.get(victim).state == "draining" for n in c.nodes),
            timeout=1.0,
            interval=0.01,
            what="every node to apply the drain",
        )
        assert took <= 1.0

        # New pairs never land on it, from any node.
        fresh = [await c.new_key(f"new{i}") for i in range(6)]
        for i, secret in enumerate(fresh):
            raw = await c.client(i % 3, secret).chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=2
            )
            assert raw.headers["x-backend-id"] != c.backend_by_url(victim).backend.cfg.backend_id

        async def moved_off() -> bool:
            return (await bound_counts(dsn))[victim] == 0

        await wait_for(moved_off, timeout=30, interval=0.05, what="the drain to finish")
        elapsed = time.monotonic() - drained_at
        # Three nodes run the mover; the fleet still moves one binding per 1/rate seconds.
        assert elapsed >= (held - 1) / rate * 0.9, (held, elapsed)
        moves = sum(
            n.metrics_registry.get_sample_value("affinity_moves_total", {"reason": "drain"})
            for n in c.nodes
        )
        assert moves == held
        for n in c.nodes:  # every node follows every move
            await wait_for(lambda n=n: n.engine.cache.bindings_of(victim) == 0)

        async def shows_drained() -> bool:
            code, out, _ = await cli("backends", "list", "--json", dsn=dsn)
            rows = {b["url"]: b for b in json.loads(out)}
            return code == 0 and rows[victim]["state"] == "drained"

        await wait_for(shows_drained, timeout=20, interval=0.5, what="`backends list`: drained")
        code, out, _ = await cli("backends", "list", "--json", dsn=dsn)
        listed = {b["url"]: b for b in json.loads(out)}
        assert listed[victim]["healthy_on"] == 3 and listed[victim]["nodes"] == 3
        assert set(listed) == {b.url for b in c.backends}

        code, _, _ = await cli("backends", "undrain", victim, dsn=dsn)
        assert code == 0
        await wait_for(
            lambda: all(n.backends.get(victim).state == "active" for n in c.nodes),
            timeout=1.0,
            interval=0.01,
            what="every node to undrain",
        )


async def test_backends_added_and_removed_at_runtime(dsn):
    extra = await serve(FakeBackendConfig(backend_id="x9", models=[MODEL]))
    try:
        async with cluster(dsn, nodes=2, backends=1, configure=paced(50.0)) as c:
            code, _, err = await cli("backends", "add", extra.url, "--model", MODEL, dsn=dsn)
            assert code == 0, err
            await wait_for(
                lambda: all(n.backends.get(extra.url) is not None for n in c.nodes),
                timeout=1.0,
                interval=0.01,
                what="every node to add it",
            )
            await bind_tenants(c, 8)  # new pairs spread over both
            assert (await bound_counts(dsn))[extra.url] > 0
            code, _, err = await cli("backends", "remove", extra.url, dsn=dsn)
            assert code == 1 and "holds" in err  # refused while it holds bindings
            code, _, _ = await cli("backends", "remove", extra.url, "--force", dsn=dsn)
            assert code == 0
            await wait_for(
                lambda: all(n.backends.get(extra.url) is None for n in c.nodes),
                timeout=1.0,
                interval=0.01,
                what="every node to drop it",
            )
            # Its pairs are served elsewhere (and rebound) at once.
            for name, secret in c.secrets.items():
                raw = await c.client(0, secret).chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, max_tokens=2
                )
                assert raw.headers["x-backend-id"] == "b0", name
    finally:
        await extra.close()


async def test_a_llamacpp_backend_joins_by_the_registry_and_takes_bindings(dsn):
    """`--kind llamacpp` passes the registry's CHECKs (migration 0008): its row and every
    node's health report of it; affinity applies to it as to a vllm backend."""
    extra = await serve(FakeBackendConfig(backend_id="x9", models=[MODEL]))
    try:
        async with cluster(dsn, nodes=2, backends=1, configure=paced(50.0)) as c:
            code, _, err = await cli(
                "backends", "add", extra.url, "--model", MODEL, "--kind", "llamacpp", dsn=dsn
            )
            assert code == 0, err

            def added() -> bool:
                found = [n.backends.get(extra.url) for n in c.nodes]
                return all(b is not None and b.kind == "llamacpp" for b in found)

            await wait_for(added, timeout=1.0, interval=0.01, what="every node to add it")
            await bind_tenants(c, 8)
            assert (await bound_counts(dsn))[extra.url] > 0

            async def reported() -> bool:
                code, out, _ = await cli("backends", "list", "--json", dsn=dsn)
                listed = {b["url"]: b for b in json.loads(out)} if code == 0 else {}
                row = listed.get(extra.url.rstrip("/"), {})
                return row.get("kind") == "llamacpp" and row.get("nodes") == 2

            await wait_for(reported, timeout=20, interval=0.5, what="both nodes' health reports")
    finally:
        await extra.close()


async def test_rebalance_after_a_scale_up_converges_and_stops(dsn):
    def fast(cfg: NodeConfig) -> None:
        cfg.rebalance.after_seconds = 0.5
        cfg.rebalance.max_moves_per_minute = 600

    extra = await serve(FakeBackendConfig(backend_id="x9", models=[MODEL]))
    try:
        async with cluster(dsn, nodes=3, backends=2, configure=fast) as c:
            await bind_tenants(c, 12)
            code, _, _ = await cli("backends", "add", extra.url, "--model", MODEL, dsn=dsn)
            assert code == 0

            async def balanced() -> bool:
                counts = await bound_counts(dsn)
                return sorted(counts.values()) == [4, 4, 4]

            await wait_for(balanced, timeout=30, interval=0.2, what="rebalance to converge")
            moves = sum(
                n.metrics_registry.get_sample_value("affinity_moves_total", {"reason": "rebalance"})
                for n in c.nodes
            )
            assert moves == 4  # exactly what was needed
            watch_until = time.monotonic() + 2.0  # and it stays put (observed for 2 s)
            while time.monotonic() < watch_until:
                assert await balanced()
                await asyncio.sleep(0.2)
            after = sum(
                n.metrics_registry.get_sample_value("affinity_moves_total", {"reason": "rebalance"})
                for n in c.nodes
            )
            assert after == moves
    finally:
        await extra.close()


async def test_dns_discovery_with_an_injected_resolver(dsn):
    port_a = await serve(FakeBackendConfig(backend_id="d2", models=[MODEL], host="127.0.0.2"))
    port = port_a.port
    second = await serve(
        FakeBackendConfig(backend_id="d3", models=[MODEL], host="127.0.0.3", port=port)
    )
    answers = {"vllm.svc": ["127.0.0.2"]}

    async def resolver(name: str, _port: int) -> list[str]:
        return answers[name]

    cfg = node_config(dsn, [port_a], "dns-node")
    cfg.backends = [BackendConfig(dns="vllm.svc", port=port, models=[MODEL])]
    cfg.discovery.interval_seconds = 0.1
    try:
        async with run_node(cfg, resolver=resolver) as node:
            assert [b.id for b in node.backends.backends] == [f"http://127.0.0.2:{port}"]
            _, secret = await key_everywhere(dsn, [node], "alice")
            client = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=secret, max_retries=0)
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, max_tokens=2
                )
                assert raw.headers["x-backend-id"] == "d2"
                answers["vllm.svc"] = ["127.0.0.3"]  # the pod moved
                await wait_for(
                    lambda: node.backends.get(f"http://127.0.0.2:{port}") is None,
                    timeout=10,
                    what="the old address to drain and leave",
                )
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, max_tokens=2
                )
                assert raw.headers["x-backend-id"] == "d3"
            finally:
                await client.close()
    finally:
        await port_a.close()
        await second.close()


async def test_backends_list_sends_nothing_to_registry_urls(dsn):
    counter = ConnectionCounter()
    url = await counter.start("127.0.0.1")
    try:
        await registry_add(dsn, url)
        for args in (("--json",), ()):
            code, out, err = await cli("backends", "list", *args, dsn=dsn)
            assert code == 0, err
            assert url in out
        assert counter.connections == 0
        listed = {
            b["url"]: b for b in json.loads((await cli("backends", "list", "--json", dsn=dsn))[1])
        }
        assert listed[url]["source"] == "registry" and listed[url]["inflight"] == 0
    finally:
        await counter.close()


async def test_a_registry_backend_outside_the_allow_list_is_never_used(dsn):
    counter = ConnectionCounter()
    refused_url = await counter.start("127.0.0.2")
    extra = await serve(FakeBackendConfig(backend_id="x9", models=[MODEL]))

    def allow_loopback_one(cfg: NodeConfig) -> None:
        cfg.backends_allow = ["127.0.0.1/32"]

    env = {"AFFINITY_BACKENDS_ALLOW": "127.0.0.1/32"}
    try:
        async with cluster(dsn, nodes=1, backends=1, configure=allow_loopback_one) as c:
            node = c.nodes[0]
            code, _, err = await cli("backends", "add", refused_url, dsn=dsn, env=env)
            assert code == 1 and "backends.allow" in err  # the CLI refuses it ...
            await registry_add(dsn, refused_url)  # ... a row written anyway is refused by nodes
            await wait_for(
                lambda: node.metrics_registry.get_sample_value("affinity_backends_refused") == 1,
                what="the node to refuse the registry row",
            )
            assert node.backends.get(refused_url) is None
            # An allowed backend added after it is taken, probed and served: the node read
            # the registry and ran its health checks since the refused row came.
            code, _, err = await cli(
                "backends", "add", extra.url, "--model", MODEL, dsn=dsn, env=env
            )
            assert code == 0, err
            await wait_for(
                lambda: (b := node.backends.get(extra.url)) is not None and b.healthy,
                what="the allowed backend in rotation",
            )
            assert node.backends.get(refused_url) is None
            await bind_tenants(c, 6)
            code, out, err = await cli("backends", "list", "--json", dsn=dsn, env=env)
            assert code == 0, err
            listed = {b["url"]: b for b in json.loads(out)}
            assert listed[refused_url]["state"] == "refused" and listed[refused_url]["refused"]
            assert listed[extra.url]["state"] == "active" and not listed[extra.url]["refused"]
        assert counter.connections == 0  # never probed, routed to or fetched
    finally:
        await counter.close()
        await extra.close()


async def test_dns_addresses_outside_the_allow_list_are_refused(dsn):
    allowed = await serve(FakeBackendConfig(backend_id="d2", models=[MODEL], host="127.0.0.2"))
    port = allowed.port
    counter = ConnectionCounter()
    refused_url = await counter.start("127.0.0.3", port)  # what DNS would make of it

    async def resolver(_name: str, _port: int) -> list[str]:
        return ["127.0.0.2", "127.0.0.3"]

    cfg = node_config(dsn, [allowed], "dns-node")
    cfg.backends = [BackendConfig(dns="vllm.svc", port=port, models=[MODEL])]
    cfg.backends_allow = ["127.0.0.2"]
    try:
        async with run_node(cfg, resolver=resolver) as node:
            assert [b.id for b in node.backends.backends] == [f"http://127.0.0.2:{port}"]
            await wait_for(lambda: node.backends.backends[0].healthy, what="probed and healthy")
        assert counter.connections == 0
        assert not HostAllowList.parse(cfg.backends_allow).allows_url(refused_url)
    finally:
        await allowed.close()
        await counter.close()
