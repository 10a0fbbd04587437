"""The backend pool: which backends exist, what they serve, whether they are healthy, how busy.

The request path asks two things per request, `candidates(model)` and (through a strategy)
which candidate is least busy, so both are cheap: the healthy backends of each canonical model
are cached as tuples and the cache is dropped only when health or a model list changes.

Health is tracked twice over. Active checks (GET /health every interval) eject a backend after
N consecutive failures and re-admit it after M consecutive successes; passive reports from the
proxy (connection errors, 5xx) eject it after N consecutive failures without waiting for the
next round. Re-admission is only ever decided by active checks, so a backend that answers
/health but fails requests flaps at the check interval, not at request rate.

Backend identity is the normalised URL (never an object address): it is what bindings store in
Postgres and what every node must spell the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, get_args
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger(__name__)

BackendKind = Literal["vllm", "external"]
"""vllm: affinity may apply (it has a prefix cache to reuse); external: never."""

_KINDS: tuple[str, ...] = get_args(BackendKind)
_DEFAULT_PORTS = {"http": 80, "https": 443}

HealthCallback = Callable[[str, bool], None]
"""Called as (backend_id, healthy) on every health transition; for metrics, not control."""


def normalise_url(url: str) -> str:
    """The backend's stable identity: lowercase scheme and host, explicit port, no trailing /.

    Every node must derive the same string from the same backend, whatever spelling each
    config uses, because bindings in Postgres refer to backends by it.
    """
    raw = url.strip()
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"backend url {raw!r}: scheme must be http or https")
    host = parts.hostname
    if not host:
        raise ValueError(f"backend url {raw!r}: no host")
    if parts.username is not None or parts.password is not None:
        # The id lands in metrics labels, logs and binding rows: no credentials there.
        raise ValueError(f"backend url {raw!r}: credentials in the url are not supported")
    if parts.query or parts.fragment:
        raise ValueError(f"backend url {raw!r}: no query or fragment allowed")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"backend url {raw!r}: {exc}") from None
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One `backends:` entry of the config; empty `models` means learn them from /v1/models."""

    url: str
    kind: BackendKind = "vllm"
    models: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One `models:` entry of the config."""

    name: str
    aliases: Sequence[str] = ()
    affinity: bool = True


@dataclass(slots=True, eq=False)
class Backend:
    """One upstream server. Compared and hashed by identity; `id` is its stable name."""

    id: str
    kind: BackendKind
    models: frozenset[str] = frozenset()
    """Canonical model names it serves."""
    discovers: bool = False
    """True when its models come from GET /v1/models rather than the config."""
    healthy: bool = True
    """Optimistic at start: a node serves at once; the first failed probe ejects (see pool)."""
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    inflight: int = 0
    """Requests forwarded and not yet finished (a stream counts until its last byte)."""
    probed: bool = False
    last_error: str | None = field(default=None)

    @property
    def url(self) -> str:
        return self.id


class BackendPool:
    """Backends, model names and health for one node; no HTTP server of its own."""

    def __init__(
        self,
        backends: Iterable[BackendSpec],
        models: Iterable[ModelSpec] = (),
        *,
        eject_after_failures: int = 3,
        readmit_after_successes: int = 2,
        health_timeout_s: float = 2.0,
        discovery_timeout_s: float = 5.0,
        default_affinity: bool = True,
        on_health_change: HealthCallback | None = None,
    ) -> None:
        _check_thresholds(eject_after_failures, readmit_after_successes)
        self._eject_after = eject_after_failures
        self._readmit_after = readmit_after_successes
        self._health_timeout = aiohttp.ClientTimeout(total=health_timeout_s)
        self._discovery_timeout = aiohttp.ClientTimeout(total=discovery_timeout_s)
        self._default_affinity = default_affinity
        self.on_health_change = on_health_change

        self._canon: dict[str, str] = {}
        self._affinity: dict[str, bool] = {}
        for spec in models:
            self._add_model(spec)

        by_id: dict[str, Backend] = {}
        for bspec in backends:
            if bspec.kind not in _KINDS:
                raise ValueError(
                    f"backend {bspec.url!r}: kind must be one of {', '.join(_KINDS)}, "
                    f"not {bspec.kind!r}"
                )
            bid = normalise_url(bspec.url)
            if bid in by_id:
                raise ValueError(f"backend {bid} is listed twice")
            served = frozenset(self._learn(m) for m in bspec.models)
            by_id[bid] = Backend(bid, bspec.kind, served, discovers=not served)
        self._backends: tuple[Backend, ...] = tuple(by_id.values())
        self._by_id = by_id
        self._candidates: dict[str, tuple[Backend, ...]] = {}
        self._candidate_ids: dict[str, tuple[str, ...]] = {}

    # -- model names -------------------------------------------------------------------------

    def _add_model(self, spec: ModelSpec) -> None:
        for name in (spec.name, *spec.aliases):
            if not name:
                raise ValueError(f"model {spec.name!r}: empty name or alias")
            owner = self._canon.get(name)
            if owner is not None and owner != spec.name:
                raise ValueError(
                    f"model name or alias {name!r} belongs to both {owner!r} and {spec.name!r}"
                )
            self._canon[name] = spec.name
        self._affinity[spec.name] = spec.affinity

    def _learn(self, model: str) -> str:
        """Canonical name for a served id; an id absent from the table is its own name."""
        canonical = self._canon.get(model)
        if canonical is None:
            canonical = self._canon[model] = model
        return canonical

    def canonical(self, model_or_alias: str) -> str | None:
        """The canonical name, or None when no config entry or backend knows it."""
        return self._canon.get(model_or_alias)

    def served_models(self) -> list[str]:
        """Canonical names with at least one healthy backend, sorted (for GET /v1/models)."""
        names: set[str] = set()
        for backend in self._backends:
            if backend.healthy:
                names.update(backend.models)
        return sorted(names)

    # -- lookups on the request path ---------------------------------------------------------

    @property
    def backends(self) -> tuple[Backend, ...]:
        return self._backends

    def get(self, backend_id: str) -> Backend | None:
        return self._by_id.get(backend_id)

    def _healthy_for(self, model: str) -> tuple[Backend, ...]:
        cached = self._candidates.get(model)
        if cached is None:
            canonical = self._canon.get(model)
            if canonical is None:
                return ()
            cached = self._candidates.get(canonical)
            if cached is None:
                cached = tuple(b for b in self._backends if b.healthy and canonical in b.models)
                self._candidates[canonical] = cached
            if canonical != model:  # cache aliases too: one dict hit per request
                self._candidates[model] = cached
        return cached

    def candidates(self, model: str) -> list[Backend]:
        """Healthy backends serving `model` (canonical name or alias), in config order.

        A fresh list over a cached tuple, so callers may reorder it freely.
        """
        return list(self._healthy_for(model))

    def candidate_ids(self, model: str) -> tuple[str, ...]:
        """The ids of `candidates(model)`, cached: no allocation on the hot path."""
        ids = self._candidate_ids.get(model)
        if ids is None:
            ids = tuple(b.id for b in self._healthy_for(model))
            if model in self._canon:  # never cache what clients invent: the dict would grow
                self._candidate_ids[model] = ids
        return ids

    def affinity_applies(self, model: str, backend: Backend) -> bool:
        """Affinity only pays where there is a prefix cache to reuse: vllm backends."""
        if backend.kind != "vllm":
            return False
        canonical = self._canon.get(model)
        if canonical is None:
            return False
        return self._affinity.get(canonical, self._default_affinity)

    def has_healthy(self) -> bool:
        """Readiness: some healthy backend serves some model (else the node cannot serve)."""
        return any(b.healthy and b.models for b in self._backends)

    def overloaded(
        self, backend: Backend, model: str, load_factor: float, spill_min_gap: float
    ) -> bool:
        """Whether a bound request should spill elsewhere.

        Both a relative and an absolute excess over the mean of the model's healthy backends
        are required, so two requests against an idle fleet never look like overload.
        """
        peers = self._healthy_for(model)
        if not peers:
            return False
        total = 0
        for peer in peers:
            total += peer.inflight
        mean = total / len(peers)
        n = backend.inflight
        return n > load_factor * mean and n >= mean + spill_min_gap

    # -- in-flight accounting ----------------------------------------------------------------

    @staticmethod
    def acquire(backend: Backend) -> None:
        backend.inflight += 1

    @staticmethod
    def release(backend: Backend) -> None:
        """Never goes below zero, so a double release cannot make a backend look idler."""
        if backend.inflight > 0:
            backend.inflight -= 1

    @contextmanager
    def track(self, backend: Backend) -> Iterator[Backend]:
        """Counts a request in flight for the duration of the block (whatever ends it)."""
        backend.inflight += 1
        try:
            yield backend
        finally:
            self.release(backend)

    # -- health ------------------------------------------------------------------------------

    def report_success(self, backend: Backend) -> None:
        """A request succeeded: breaks a run of failures. Does not re-admit (checks do)."""
        backend.consecutive_failures = 0

    def report_failure(self, backend: Backend, reason: str) -> None:
        """A request failed at the backend (connection error, 5xx; the caller decides).

        Ejects at once on the N-th consecutive failure instead of waiting for a check round.
        """
        self._failed(backend, reason, first_probe=False)

    def _failed(self, backend: Backend, reason: str, *, first_probe: bool) -> None:
        backend.consecutive_successes = 0
        backend.consecutive_failures += 1
        backend.last_error = reason
        if backend.healthy and (first_probe or backend.consecutive_failures >= self._eject_after):
            self._set_health(backend, False, reason)

    def _succeeded_probe(self, backend: Backend) -> bool:
        """Returns True when this success re-admitted the backend."""
        backend.probed = True
        backend.consecutive_failures = 0
        backend.consecutive_successes += 1
        backend.last_error = None
        if not backend.healthy and backend.consecutive_successes >= self._readmit_after:
            self._set_health(backend, True, "health checks pass")
            return True
        return False

    def _set_health(self, backend: Backend, healthy: bool, reason: str) -> None:
        backend.healthy = healthy
        backend.consecutive_successes = 0
        self._invalidate()
        if healthy:
            log.warning("backend %s re-admitted: %s", backend.id, reason)
        else:
            log.warning("backend %s ejected: %s", backend.id, reason)
        callback = self.on_health_change
        if callback is not None:
            try:
                callback(backend.id, healthy)
            except Exception:
                log.exception("on_health_change callback failed for %s", backend.id)

    def _invalidate(self) -> None:
        self._candidates.clear()
        self._candidate_ids.clear()

    async def _probe(self, session: aiohttp.ClientSession, backend: Backend) -> str | None:
        """None when /health answers 2xx in time, else why not."""
        try:
            async with session.get(
                f"{backend.id}/health", timeout=self._health_timeout, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"/health answered {resp.status}"
        except TimeoutError:
            return "/health timed out"
        except (aiohttp.ClientError, OSError) as exc:
            return f"/health failed: {exc.__class__.__name__}: {exc}"

    async def check_once(self, session: aiohttp.ClientSession) -> None:
        """One round of active checks on every backend, concurrently; then due discoveries.

        A backend that fails its very first probe is ejected at once: the optimistic start
        should not cost N rounds of failed requests against a server that was never up.
        """
        results = await asyncio.gather(*(self._probe(session, b) for b in self._backends))
        to_discover: list[Backend] = []
        for backend, error in zip(self._backends, results, strict=True):
            if error is None:
                readmitted = self._succeeded_probe(backend)
                # A re-admitted server may have restarted with other models: ask again.
                if backend.discovers and backend.healthy and (readmitted or not backend.models):
                    to_discover.append(backend)
            else:
                first = not backend.probed
                backend.probed = True
                self._failed(backend, error, first_probe=first)
        if to_discover:
            await asyncio.gather(*(self._discover_one(session, b) for b in to_discover))

    async def run_health_checks(
        self,
        session: aiohttp.ClientSession,
        interval_s: float,
        eject_after_failures: int,
        readmit_after_successes: int = 2,
    ) -> None:
        """Check every `interval_s` until cancelled. The thresholds given here become the
        pool's, so passive reports eject after the same N."""
        _check_thresholds(eject_after_failures, readmit_after_successes)
        if interval_s <= 0:
            raise ValueError(f"health interval must be positive, not {interval_s}")
        self._eject_after = eject_after_failures
        self._readmit_after = readmit_after_successes
        while True:
            started = time.monotonic()
            try:
                await self.check_once(session)
            except Exception:  # the loop must outlive any one bad round
                log.exception("backend health round failed")
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    # -- discovery ---------------------------------------------------------------------------

    async def discover(self, session: aiohttp.ClientSession) -> None:
        """Learn the models of backends configured without any; failures retry next round."""
        pending = [b for b in self._backends if b.discovers and not b.models]
        if pending:
            await asyncio.gather(*(self._discover_one(session, b) for b in pending))

    async def _discover_one(self, session: aiohttp.ClientSession, backend: Backend) -> bool:
        """Replace the backend's models with what /v1/models lists; keep them on failure."""
        try:
            async with session.get(
                f"{backend.id}/v1/models", timeout=self._discovery_timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise ValueError(f"answered {resp.status}")
                body = await resp.json(content_type=None)
            ids = _model_ids(body)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            backend.last_error = f"/v1/models: {reason}"
            log.warning("backend %s: model discovery failed: %s", backend.id, reason)
            return False
        models = frozenset(self._learn(i) for i in ids)
        if models != backend.models:
            backend.models = models
            self._invalidate()
            log.info("backend %s serves %s", backend.id, ", ".join(sorted(models)) or "nothing")
        return True


def _model_ids(body: object) -> list[str]:
    """The ids of an OpenAI-style model list; ValueError on any other shape."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("no 'data' list in the model list")
    ids: list[str] = []
    for item in data:
        model_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(model_id, str) and model_id:
            ids.append(model_id)
    return ids


def _check_thresholds(eject_after_failures: int, readmit_after_successes: int) -> None:
    if eject_after_failures < 1:
        raise ValueError(f"eject_after_failures must be >= 1, not {eject_after_failures}")
    if readmit_after_successes < 1:
        raise ValueError(f"readmit_after_successes must be >= 1, not {readmit_after_successes}")
