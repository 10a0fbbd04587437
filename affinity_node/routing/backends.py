"""The backend pool: which backends exist, what models they serve, how busy they are.

The request path asks two things per request, `candidates(model)` and (through a strategy)
which candidate is least busy, so both are cheap: the healthy backends of each canonical model
are cached as tuples and the cache is dropped only when health or a model list changes.

Backend identity is the normalised URL (never an object address): it is what bindings store in
Postgres and what every node must spell the same way. Health decisions are
routing/health_state.py's; talking to backends is upstream/'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from affinity_node.vocabulary import BACKEND_KINDS, CACHE_KINDS, BackendKind, BackendState

Origin = Literal["config", "registry", "dns"]
"""Where a backend came from: the YAML, the registry (`backends add`), or DNS discovery."""

_DEFAULT_PORTS = {"http": 80, "https": 443}


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
class ListedModel:
    """One entry of a backend's GET /v1/models: a LoRA adapter names its base as `parent`."""

    id: str
    parent: str | None = None


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
    """Canonical model names it serves: its configured ones plus the adapters it lists, or
    (configured without any) everything it lists."""
    discovers: bool = False
    """True when GET /v1/models is asked what it serves: every vllm or llamacpp backend
    (adapters come and go at runtime) and any backend configured without models."""
    configured: frozenset[str] = frozenset()
    """Canonical names from the config (or registry, DNS entry); empty: learn them all."""
    healthy: bool = True
    """Optimistic at start: a node serves at once; the first failed probe ejects (see health)."""
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    inflight: int = 0
    """Requests forwarded and not yet finished (a stream counts until its last byte)."""
    probed: bool = False
    last_error: str | None = field(default=None)
    state: BackendState = "active"
    """Admin state from the registry (or DNS discovery): draining takes no new bindings."""
    origin: Origin = "config"
    drain_deadline: datetime | None = None
    """When a drain must be done by (the registry's), if any."""
    running: float | None = None
    """From the backend's own /metrics at the last poll (all nodes' requests); None: unknown."""
    waiting: float | None = None
    kv_usage: float | None = None
    inflight_at_poll: int = 0
    """This node's in-flight count when it polled: what it added since is the difference."""

    @property
    def url(self) -> str:
        return self.id


class BackendPool:
    """Backends and model names for one node; no network code of its own."""

    def __init__(
        self,
        backends: Iterable[BackendSpec],
        models: Iterable[ModelSpec] = (),
        *,
        default_affinity: bool = True,
        on_remove: Callable[[Backend], None] | None = None,
    ) -> None:
        """`on_remove` is told when a backend leaves (registry, DNS discovery), so per-backend
        state kept elsewhere (metric series, pooled connections) leaves with it."""
        self._default_affinity = default_affinity
        self._on_remove = on_remove
        self._canon: dict[str, str] = {}
        self._affinity: dict[str, bool] = {}
        for spec in models:
            self._add_model(spec)

        by_id: dict[str, Backend] = {}
        for bspec in backends:
            if bspec.kind not in BACKEND_KINDS:
                raise ValueError(
                    f"backend {bspec.url!r}: kind must be one of {', '.join(BACKEND_KINDS)}, "
                    f"not {bspec.kind!r}"
                )
            bid = normalise_url(bspec.url)
            if bid in by_id:
                raise ValueError(f"backend {bid} is listed twice")
            by_id[bid] = self._new_backend(bid, bspec, "config")
        self._backends: tuple[Backend, ...] = tuple(by_id.values())
        self._by_id = by_id
        self._parents: dict[str, str] = {}
        """Canonical adapter name -> canonical base model, as backends last listed it."""
        self._candidates: dict[str, tuple[Backend, ...]] = {}
        self._candidate_ids: dict[str, tuple[str, ...]] = {}
        self._inflight_sums: dict[str, int] | None = None
        """Canonical model -> in-flight requests on its candidates, for `overloaded` in O(1)."""

    def _new_backend(self, bid: str, spec: BackendSpec, origin: Origin) -> Backend:
        served = frozenset(self._learn(m) for m in spec.models)
        discovers = spec.kind in CACHE_KINDS or not served
        return Backend(bid, spec.kind, served, discovers, configured=served, origin=origin)

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
            if backend.healthy and backend.state != "disabled":
                names.update(backend.models)
        return sorted(names)

    def parent_of(self, model: str) -> str | None:
        """The base model of a LoRA adapter (canonical names); None for a base model."""
        return self._parents.get(model)

    def set_models(self, backend: Backend, listed: Iterable[ListedModel | str]) -> bool:
        """What discovery learned a backend serves now; True when that changed its models.

        A backend with configured models serves those plus the listed adapters of them (a
        base model the config left out is not routed there, nor are its adapters); one
        without serves everything listed. Adapters missing from the list leave its set.
        """
        bases: list[str] = []
        adapters: dict[str, str] = {}
        for item in listed:
            entry = ListedModel(item) if isinstance(item, str) else item
            if entry.parent is None or entry.parent == entry.id:
                bases.append(entry.id)
            else:
                adapters[entry.id] = self._canon.get(entry.parent, entry.parent)
        configured = backend.configured
        if configured:
            adapters = {a: p for a, p in adapters.items() if p in configured}
            served = set(configured)
        else:
            served = {self._learn(b) for b in bases}
        for adapter, parent in adapters.items():
            name = self._learn(adapter)
            if name != parent:
                self._parents[name] = parent
                served.add(name)
        models = frozenset(served)
        if models == backend.models:
            return False
        backend.models = models
        self.invalidate()
        return True

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
                cached = tuple(
                    b
                    for b in self._backends
                    if b.healthy and b.state != "disabled" and canonical in b.models
                )
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
        """Affinity only pays where there is a prefix cache to reuse: vllm and llama.cpp."""
        if backend.kind not in CACHE_KINDS:
            return False
        canonical = self._canon.get(model)
        if canonical is None:
            return False
        configured = self._affinity.get(canonical)
        if configured is None:  # an adapter not named in `models:` follows its base model
            configured = self._affinity.get(self._parents.get(canonical, canonical))
        return self._default_affinity if configured is None else configured

    # -- changes at runtime (registry, DNS discovery) ----------------------------------------

    def add(self, spec: BackendSpec, origin: Origin) -> Backend:
        """A backend that joins at runtime; an existing one keeps its identity and state."""
        bid = normalise_url(spec.url)
        existing = self._by_id.get(bid)
        if existing is not None:
            return existing
        if spec.kind not in BACKEND_KINDS:
            raise ValueError(f"backend {bid}: kind must be one of {', '.join(BACKEND_KINDS)}")
        backend = self._new_backend(bid, spec, origin)
        self._by_id[bid] = backend
        self._backends = (*self._backends, backend)
        self.invalidate()
        return backend

    def remove(self, backend_id: str) -> Backend | None:
        """The backend leaves; requests already holding it finish there."""
        backend = self._by_id.pop(backend_id, None)
        if backend is not None:
            self._backends = tuple(b for b in self._backends if b is not backend)
            self.invalidate()
            if self._on_remove is not None:
                self._on_remove(backend)
        return backend

    def set_state(self, backend: Backend, state: BackendState) -> bool:
        """True when the state changed."""
        if backend.state == state:
            return False
        backend.state = state
        self.invalidate()
        return True

    def has_healthy(self) -> bool:
        """Readiness: some healthy backend serves some model (else the node cannot serve)."""
        return any(b.healthy and b.models and b.state != "disabled" for b in self._backends)

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
        sums = self._inflight_sums
        if sums is None:
            sums = self._inflight_sums = self._sum_inflight()
        mean = sums.get(self._canon.get(model, model), 0) / len(peers)
        n = backend.inflight
        return n > load_factor * mean and n >= mean + spill_min_gap

    def _sum_inflight(self) -> dict[str, int]:
        """Per canonical model, the in-flight requests of its candidates (healthy, not
        disabled); kept current by acquire/release until health or models change."""
        sums: dict[str, int] = {}
        for backend in self._backends:
            if backend.healthy and backend.state != "disabled":
                for model in backend.models:
                    sums[model] = sums.get(model, 0) + backend.inflight
        return sums

    def invalidate(self) -> None:
        """Health or models changed: the cached candidate lists are rebuilt on next use."""
        self._candidates.clear()
        self._candidate_ids.clear()
        self._inflight_sums = None

    # -- in-flight accounting ----------------------------------------------------------------

    def acquire(self, backend: Backend) -> None:
        backend.inflight += 1
        self._count(backend, 1)

    def release(self, backend: Backend) -> None:
        """Never goes below zero, so a double release cannot make a backend look idler."""
        if backend.inflight > 0:
            backend.inflight -= 1
            self._count(backend, -1)

    def _count(self, backend: Backend, delta: int) -> None:
        sums = self._inflight_sums
        if sums is not None and backend.healthy and backend.state != "disabled":
            for model in backend.models:
                sums[model] = sums.get(model, 0) + delta
