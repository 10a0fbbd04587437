"""A backend that leaves takes its metric series and pooled connections with it (issue 21,
defect 9): under DNS churn they would otherwise grow without bound."""

from __future__ import annotations

import aiohttp
import openai

from affinity_node.app import RunningNode, run_node
from affinity_node.config import BackendConfig
from affinity_node.http.state import UPSTREAM
from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from tests.integration.test_cli import cli
from tests.integration.test_lifecycle import MESSAGES, bind_tenants, paced
from tests.support.cluster import MODEL, cluster, key_everywhere, node_config
from tests.support.waiting import wait_for


async def scrape(node: RunningNode) -> str:
    async with aiohttp.ClientSession() as s, s.get(node.ops_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def pooled(node: RunningNode, url: str) -> bool:
    return node.app[UPSTREAM]._connections.has(url)  # what the forwarding pool keeps per backend


def upstream_lines(text: str, url: str) -> list[str]:
    return [line for line in text.splitlines() if f'backend="{url}"' in line]


async def test_a_backend_removed_from_the_registry_leaves_no_series_and_no_pool_entry(dsn):
    extra = await serve(FakeBackendConfig(backend_id="x9", models=[MODEL]))
    try:
        async with cluster(dsn, nodes=1, backends=1, configure=paced(50.0)) as c:
            node = c.nodes[0]
            code, _, err = await cli("backends", "add", extra.url, "--model", MODEL, dsn=dsn)
            assert code == 0, err
            await wait_for(lambda: node.backends.get(extra.url) is not None, what="the add")
            await bind_tenants(c, 8)
            assert extra.stats.requests > 0, "some requests must have gone to the new backend"
            before = upstream_lines(await scrape(node), extra.url)
            assert any(line.startswith("affinity_upstream_requests_total") for line in before)
            assert any(line.startswith("affinity_upstream_ttft_seconds") for line in before)
            assert pooled(node, extra.url)

            code, _, err = await cli("backends", "remove", extra.url, "--force", dsn=dsn)
            assert code == 0, err
            await wait_for(lambda: node.backends.get(extra.url) is None, what="the removal")
            assert upstream_lines(await scrape(node), extra.url) == []
            assert not pooled(node, extra.url)
            # The node serves on, and the remaining backend keeps its series.
            await c.client(0, c.secrets["t0"]).chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=2
            )
            assert upstream_lines(await scrape(node), c.backends[0].url)
    finally:
        await extra.close()


async def test_an_address_that_leaves_dns_leaves_no_series_and_no_pool_entry(dsn):
    first = await serve(FakeBackendConfig(backend_id="d2", models=[MODEL], host="127.0.0.2"))
    port = first.port
    second = await serve(
        FakeBackendConfig(backend_id="d3", models=[MODEL], host="127.0.0.3", port=port)
    )
    answers = {"vllm.svc": ["127.0.0.2"]}

    async def resolver(name: str, _port: int) -> list[str]:
        return answers[name]

    cfg = node_config(dsn, [first], "dns-node")
    cfg.backends = [BackendConfig(dns="vllm.svc", port=port, models=[MODEL])]
    cfg.discovery.interval_seconds = 0.1
    old = f"http://127.0.0.2:{port}"
    try:
        async with run_node(cfg, resolver=resolver) as node:
            _, secret = await key_everywhere(dsn, [node], "alice")
            client = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=secret, max_retries=0)
            try:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
                assert upstream_lines(await scrape(node), old)
                assert pooled(node, old)
                answers["vllm.svc"] = ["127.0.0.3"]  # the pod moved
                await wait_for(
                    lambda: node.backends.get(old) is None, timeout=10, what="the old to leave"
                )
                await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            finally:
                await client.close()
            text = await scrape(node)
            assert upstream_lines(text, old) == []
            assert upstream_lines(text, f"http://127.0.0.3:{port}")
            assert not pooled(node, old)
    finally:
        await first.close()
        await second.close()
