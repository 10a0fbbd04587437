"""Live: a real Prometheus scrapes a running cluster; every dashboard and rule query works.

Two nodes and three fake vLLM backends run in this process on real Postgres; a `prometheus`
subprocess scrapes them every second with the rule files loaded. The openai SDK drives traffic
(streams and not, chat and completions, several keys, bad keys, a backend failure that forces
a rebind). Then every PromQL expression of grafana/dashboards/*.json and of
deploy/prometheus/rules/*.yml goes through Prometheus's HTTP API: all must parse, every panel
query must return data, and the hit and miss counts Prometheus holds must equal what the
clients saw in the `x-affinity` headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from affinity_node.devtools import dashboards
from affinity_node.http.endpoints import ENDPOINTS
from affinity_node.http.state import METRICS_REGISTRY
from affinity_node.sim.support import free_port
from tests.support.cluster import MODEL, Cluster, cluster
from tests.support.waiting import wait_for
from tests.system.test_promtool import RULES, promtool, require_binary

CONTRACT_METRICS = (
    "affinity_cache_hits_total",
    "affinity_cache_misses_total",
    "affinity_lock_wait_seconds",
    "affinity_rebinds_total",
    "affinity_spills_total",
    "affinity_cache_entries",
    "affinity_notifications_total",
    "affinity_notify_lag_seconds",
    "affinity_listener_up",
    "affinity_listener_reconnects_total",
    "affinity_cache_resyncs_total",
    "affinity_refresh_writes_total",
    "affinity_db_errors_total",
    "affinity_http_requests_total",
    "affinity_http_request_duration_seconds",
    "affinity_proxy_overhead_seconds",
    "affinity_upstream_requests_total",
    "affinity_upstream_ttft_seconds",
    "affinity_upstream_inflight",
    "affinity_backend_healthy",
    "affinity_db_up",
    "affinity_build_info",
)
HISTOGRAMS = {
    "affinity_lock_wait_seconds",
    "affinity_notify_lag_seconds",
    "affinity_http_request_duration_seconds",
    "affinity_proxy_overhead_seconds",
    "affinity_upstream_ttft_seconds",
}

LEGITIMATELY_EMPTY: dict[str, str] = {
    # (panel title, refId) -> why it may return nothing. None today: counters and histograms
    # with known labels start at zero, and ratios that could be empty use `or vector(0)`.
}

SYSTEM = " ".join(f"Rule {i}: answer briefly and cite the cache block you used." for i in range(12))
"""Long enough to fill several 16-token blocks: returning requests hit the prefix cache."""
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Explain prefix caching in one line."},
]


SCRAPE_INTERVAL_S = 1.0


def hostport(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


@dataclass
class Prometheus:
    url: str
    http: aiohttp.ClientSession
    log: Path

    async def api(self, path: str, **params: str) -> Any:
        async with self.http.get(f"{self.url}/api/v1/{path}", params=params) as r:
            body = await r.json(content_type=None)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        return list(result)

    async def value(self, expr: str) -> float:
        result = await self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    async def scraped_after(self, moment: float, jobs: str = "affinity-node|vllm") -> bool:
        """Every target has a sample from a scrape that began after `moment` (unix time)."""
        result = await self.query(f'timestamp(up{{job=~"{jobs}"}})')
        return bool(result) and min(float(r["value"][1]) for r in result) > moment

    async def settled(self, moment: float) -> bool:
        """Two scrapes of every target since `moment`: the last one began after it (so it saw
        everything before it), and a series born just before `moment` has the two samples
        that `rate()` needs."""
        return await self.scraped_after(moment + SCRAPE_INTERVAL_S + 0.1)

    async def all_up(self, expected: int) -> bool:
        result = await self.query('up{job=~"affinity-node|vllm"} == 1')
        return len(result) == expected


@contextlib.asynccontextmanager
async def prometheus(
    tmp_path: Path, nodes: list[str], backends: list[str]
) -> AsyncIterator[Prometheus]:
    binary = require_binary("prometheus")
    port = free_port()
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S:g}s",
            "evaluation_interval": "1s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S:g}s",
        },
        "rule_files": [str(p) for p in RULES],
        "scrape_configs": [
            {"job_name": "affinity-node", "static_configs": [{"targets": nodes}]},
            {"job_name": "vllm", "static_configs": [{"targets": backends}]},
        ],
    }
    cfg_path = tmp_path / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={cfg_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage",
            "--log.level=info",
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert proc.returncode is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
                try:
                    async with http.get(f"{url}/-/ready") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout=30, interval=0.1, what="prometheus ready")
            yield Prometheus(url, http, log)
    except BaseException:
        print(f"--- prometheus log (tail) ---\n{log.read_text()[-3000:]}")
        raise
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def request(
    client: openai.AsyncOpenAI, kind: str, stream: bool, rid: str | None = None
) -> tuple[str, str]:
    """One request; returns (x-affinity, x-backend-id)."""
    extra = {"x-request-id": rid} if rid else None
    if kind == "chat":
        raw: Any = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, stream=stream, extra_headers=extra
        )
    else:
        raw = await client.completions.with_raw_response.create(
            model=MODEL,
            prompt=SYSTEM + " The prefix cache keeps",
            max_tokens=8,
            stream=stream,
            extra_headers=extra,
        )
    body = raw.parse()
    if stream:
        chunks = [chunk async for chunk in body]
        assert chunks
    return raw.headers["x-affinity"], raw.headers["x-backend-id"]


async def admin_fail(url: str, body: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/admin/fail", json=body) as r:
        assert r.status == 200


def substitute(expr: str) -> str:
    """Grafana's variables -> what a dashboard user with "All" selected would send."""
    expr = expr.replace("${__rate_interval}", "1m").replace("$__rate_interval", "1m")
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


def rule_expressions() -> list[tuple[str, str]]:
    out = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((rule.get("alert") or rule["record"], rule["expr"]))
    return out


def describe(result: list[dict[str, Any]]) -> str:
    """ "N series, e.g. {labels} = value", preferring a series with a non-zero value."""
    if not result:
        return "0 series"

    def telling(r: dict[str, Any]) -> bool:
        v = float(r["value"][1])
        return not math.isnan(v) and v != 0

    first = next((r for r in result if telling(r)), result[0])
    labels = ",".join(f"{k}={v}" for k, v in sorted(first["metric"].items()) if k != "__name__")
    value = float(first["value"][1])
    shown = "NaN" if math.isnan(value) else f"{value:.4g}"
    return f"{len(result)} series, e.g. {{{labels}}} = {shown}"


async def drive_hits_and_misses(c: Cluster, secrets: list[str]) -> Counter[str]:
    """Every key on both nodes, chat and completions, streamed and not: only hit/miss."""
    plan = [
        (0, "chat", False),
        (1, "chat", True),
        (0, "completion", True),
        (1, "completion", False),
        (1, "chat", False),
        (0, "chat", True),
    ]
    seen: Counter[str] = Counter()

    async def one_key(k: int, secret: str) -> None:
        clients = [c.client(0, secret), c.client(1, secret)]
        for i, (node, kind, stream) in enumerate(plan):
            affinity, _ = await request(clients[node], kind, stream, rid=f"live-{k}-{i}")
            seen[affinity] += 1

    await asyncio.gather(*(one_key(k, s) for k, s in enumerate(secrets)))
    return seen


async def test_dashboards_and_rules_evaluate_live(dsn, tmp_path):
    require_binary("prometheus")
    async with cluster(dsn, nodes=2, backends=3) as c:
        nodes = [hostport(n.url) for n in c.nodes]
        backends = [hostport(b.url) for b in c.backends]
        async with prometheus(tmp_path, nodes, backends) as prom:
            await wait_for(
                lambda: prom.all_up(len(nodes) + len(backends)),
                timeout=30,
                interval=0.2,
                what="every target scraped and up",
            )

            # -- phase 1: only hits and misses; counted exactly ----------------------------
            secrets = [await c.new_key(name) for name in ("alice", "bob", "carol", "dave")]
            seen = await drive_hits_and_misses(c, secrets)
            assert set(seen) <= {"hit", "miss", "degraded"}, seen
            assert seen["miss"] >= len(secrets) and seen["hit"] >= 1, seen
            done = time.time()
            await wait_for(
                lambda: prom.settled(done),
                timeout=30,
                interval=0.2,
                what="scrapes of every target after the traffic",
            )
            hits = await prom.value("sum(affinity_cache_hits_total)")
            misses = await prom.value("sum(affinity_cache_misses_total)")
            assert (hits, misses) == (seen["hit"], seen["miss"] + seen["degraded"]), seen

            # -- phase 2: errors, a failing backend, a rebind ------------------------------
            bad = c.client(0, "sk-not-a-real-key-0123456789")
            for _ in range(2):
                with pytest.raises(openai.AuthenticationError):
                    await request(bad, "chat", False)
            with pytest.raises(openai.NotFoundError):
                await c.client(1, secrets[0]).chat.completions.create(
                    model="no-such-model", messages=MESSAGES
                )
            alice = c.client(0, secrets[0])
            _, bound = await request(alice, "chat", False)
            failing = c.backends[int(bound[1:])]
            await admin_fail(failing.url, {"status": 503})
            # One failed request is not enough to move a binding; the node's health checks
            # (/health answers 503 too) eject it, then the next request rebinds.
            failing_id = f"http://127.0.0.1:{failing.port}"
            await wait_for(
                lambda: not c.nodes[0].backends.get(failing_id).healthy,
                what="the failing backend to be ejected",
            )
            affinity, served = await request(alice, "chat", True, rid="live-rebind")
            assert affinity == "rebind" and served != bound
            for i in range(4):
                await request(c.client(i % 2, secrets[0]), "chat", bool(i % 2))
            await admin_fail(failing.url, {})
            done = time.time()
            await wait_for(
                lambda: prom.settled(done),
                timeout=30,
                interval=0.2,
                what="scrapes after the failure",
            )
            rebinds = await prom.value("sum(affinity_rebinds_total)")
            assert rebinds >= 1
            # What Prometheus holds is what the nodes count.
            for name in (
                "affinity_cache_hits_total",
                "affinity_cache_misses_total",
                "affinity_rebinds_total",
            ):
                local = sum(
                    s.value
                    for n in c.nodes
                    for fam in n.app[METRICS_REGISTRY].collect()
                    for s in fam.samples
                    if s.name == name
                )
                assert await prom.value(f"sum({name})") == local, name

            # -- every Contract metric reached Prometheus from every node ------------------
            names = await prom.query('count by (__name__, instance) ({__name__=~"affinity_.*"})')
            by_name: dict[str, set[str]] = {}
            for r in names:
                by_name.setdefault(r["metric"]["__name__"], set()).add(r["metric"]["instance"])
            for metric in CONTRACT_METRICS:
                series = metric + "_bucket" if metric in HISTOGRAMS else metric
                assert by_name.get(series) == set(nodes), (metric, by_name.get(series))

            # -- the rules: loaded, evaluated without error, every expression parses -------
            async def rules_evaluated() -> bool:
                groups = (await prom.api("rules"))["groups"]
                rules = [r for g in groups for r in g["rules"]]
                return len(rules) == len(rule_expressions()) and all(
                    r["health"] == "ok" for r in rules
                )

            await wait_for(rules_evaluated, timeout=30, interval=0.2, what="rules evaluated")
            report: list[str] = []
            for name, expr in rule_expressions():
                result = await prom.query(expr)  # raises unless it parses and evaluates
                report.append(f"rule {name}: {describe(result)}")

            # -- every dashboard query returns data ---------------------------------------
            empty: list[str] = []
            for file, build in dashboards.DASHBOARDS.items():
                board = build()
                for title, ref, expr in dashboards.expressions(board):
                    result = await prom.query(substitute(expr))
                    report.append(f"{board['title']} / {title} [{ref}]: {describe(result)}")
                    if not result and (title, ref) not in LEGITIMATELY_EMPTY:
                        empty.append(f"{file}: {title} [{ref}]: {expr}")
            print("\n".join(report))
            # Affinity at work: returning requests found their prompt in the backend's cache.
            assert (
                await prom.value(
                    substitute(
                        'sum(rate({__name__=~"vllm[:_]prefix_cache_hits_total"}[$__rate_interval]))'
                    )
                )
                > 0
            )
            assert empty == [], "panels without data:\n" + "\n".join(empty)

            # -- the template variables' queries list the nodes and the model --------------
            instances = await prom.api(
                "label/instance/values", **{"match[]": "affinity_build_info"}
            )
            assert sorted(instances) == sorted(nodes)
            models = await prom.api(
                "label/model/values", **{"match[]": "affinity_cache_hits_total"}
            )
            assert models == [MODEL]

            # -- exemplars: the request id of a latency observation ------------------------
            now = time.time()
            for metric in (
                "affinity_http_request_duration_seconds_bucket",
                "affinity_upstream_ttft_seconds_bucket",
            ):
                data = await prom.api(
                    "query_exemplars", query=metric, start=str(now - 600), end=str(now + 60)
                )
                ids = {e["labels"].get("request_id") for s in data for e in s["exemplars"]}
                assert any(i and i.startswith("live-") for i in ids), (metric, ids)


async def fetch_metrics(url: str, accept: str | None = None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics", headers=headers) as r:
        assert r.status == 200
        return await r.text(), r.headers["Content-Type"]


async def test_live_metrics_pass_promtool_carry_exemplars_and_no_secrets(dsn):
    require_binary("promtool")
    async with cluster(dsn, nodes=1, backends=2) as c:
        secret = await c.new_key("alice")
        client = c.client(0, secret)
        for i in range(3):
            await request(client, "chat", bool(i % 2), rid=f"exemplar-{i}")
        with pytest.raises(openai.AuthenticationError):
            await request(c.client(0, "sk-wrong-" + secret[3:]), "chat", False)
        url = c.nodes[0].url

        text, ctype = await fetch_metrics(url)
        assert ctype.startswith("text/plain")
        result = await asyncio.to_thread(promtool, "check", "metrics", stdin=text)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "# {" not in text  # exemplars only in OpenMetrics
        key_id = str(c.key_ids["alice"])
        for forbidden in (secret, secret[3:], key_id, key_id.replace("-", "")):
            assert forbidden not in text

        names = {f.name for f in text_string_to_metric_families(text)}
        for metric in CONTRACT_METRICS:
            family = metric.removesuffix("_total")
            assert family in names, metric

        # Labels are bounded: known routes, backends the node knows, canonical models.
        backend_ids = {f"http://{hostport(b.url)}" for b in c.backends}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if "model" in labels:
                    assert labels["model"] == MODEL, sample
                if "backend" in labels:
                    assert labels["backend"] in backend_ids, sample
                if "route" in labels:
                    assert labels["route"] in {e.path for e in ENDPOINTS} | {
                        "/v1/models",
                        "/healthz",
                        "/readyz",
                        "/metrics",
                        "other",
                    }, sample

        om, ctype = await fetch_metrics(url, "application/openmetrics-text; version=1.0.0")
        assert ctype.startswith("application/openmetrics-text")
        exemplars = {
            name: re.findall(
                rf'^{name}_bucket\{{.*\}} \S+ # \{{request_id="([^"]+)"\}}', om, re.MULTILINE
            )
            for name in ("affinity_http_request_duration_seconds", "affinity_upstream_ttft_seconds")
        }
        for name, ids in exemplars.items():
            assert any(i.startswith("exemplar-") for i in ids), (name, ids)
        assert json.dumps(exemplars)  # plain strings only
