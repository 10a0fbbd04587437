"""The product's words, each spelled once. Everything else derives from these Literal types
(`typing.get_args`), so a new outcome or strategy is added here and nowhere else."""

from __future__ import annotations

from typing import Final, Literal, get_args

MissOutcome = Literal["created", "found_in_db", "found_after_lock", "degraded"]
"""How a resolve that needed the database ended (label `outcome` of the miss counter)."""

Outcome = Literal["hit", "rebind", MissOutcome]
"""What the engine answered for one resolve."""

AffinityHeader = Literal["hit", "miss", "rebind", "spill", "degraded", "bypass"]
"""The `x-affinity` response header: what affinity did for this request."""

RebindReason = Literal["unhealthy", "failover", "drain", "rebalance"]
NotifyOp = Literal["insert", "update", "delete"]
"""Operations the binding table's trigger announces."""

KeyEventOp = Literal["create", "revoke", "restore", "delete", "limits"]
"""Operations the api_keys trigger announces (limits: api_key_limits changed for the key)."""

LimitKind = Literal["rpm", "tpm", "concurrent"]
"""Which per-key limit refused a request (label `limit` of affinity_ratelimited_total)."""

StrategyName = Literal["least_outstanding", "round_robin", "random"]
"""`routing.fallback`: who picks a backend when affinity does not decide."""

StoreKind = Literal["postgres", "memory"]
"""`affinity.store`: bindings shared through Postgres, or kept by each node alone."""

BackendKind = Literal["vllm", "llamacpp", "external"]
"""vllm, llamacpp: affinity may apply (each has a prefix cache to reuse, reports its load on
/metrics and answers `stream_options.include_usage`); external: never."""

BackendState = Literal["active", "draining", "disabled"]
"""Admin state (the registry): draining takes no new bindings and gives its own away;
disabled serves nothing."""

MoveReason = Literal["drain", "rebalance"]
"""Why the fleet's mover moved a binding."""

DbOperation = Literal[
    "read",
    "create",
    "rebind",
    "members",
    "refresh",
    "cleanup",
    "snapshot",
    "catchup",
    "ping",
    "list",
    "purge",
    "ledger",
]
"""Store operations whose failures are counted (label `operation` of the db error counter)."""

EvictReason = Literal["size", "expired"]
"""Why an entry left the cache on its own: a live one pushed out by the size bound, or one
past its deadline swept."""

ResyncMode = Literal["incremental", "full"]
"""How a resync after LISTEN read the table: what changed since the node's watermark (and the
deletion log), or every live binding in pages."""

SnapshotState = Literal["waiting", "loading", "done"]
"""The bindings snapshot as /readyz reports it: none read yet, pages being read, complete."""

RejectReason = Literal["malformed", "backend", "ttl", "version"]
"""Why a binding notification was not trusted (it is then treated as an invalidation)."""

KeyLookupReason = Literal["unknown", "created", "verify", "poll"]
"""Why the key cache asked the database (see the key cache)."""

KeyRefusal = Literal["unknown", "rate_limited", "unavailable"]
"""Why a bearer token was refused."""

FanoutDirection = Literal["grow", "shrink"]
FanoutReason = Literal["hot", "cool", "quiet", "unhealthy", "drain"]
"""Why a set grew (a member hot, none cool) or shrank (every member cool, the pair's own
request rate down to what fewer members carried, or a member unhealthy)."""

SpillReason = Literal["load", "failover"]
"""Why a request went past its bound backend while the binding stayed: the bound backend was
over the load bound, or failed and was not (yet) unhealthy, so another one served."""

LedgerOutcome = Literal[AffinityHeader, "fanout"]
"""What routing did for a request, as the usage ledger counts it: the `x-affinity` header,
except that a hit served by a set member other than the first is `fanout` (so `hit` +
`fanout` = the requests answered `x-affinity: hit`). Each is a column `<outcome>_requests`."""

LedgerDrop = Literal["full", "rejected", "shutdown"]
"""Why counted requests never reached the ledger table: memory bound reached while the
database was away, a batch the database refused, or a stop with the database unreachable."""

MISS_OUTCOMES: Final[tuple[MissOutcome, ...]] = get_args(MissOutcome)
AFFINITY_HEADERS: Final[tuple[AffinityHeader, ...]] = get_args(AffinityHeader)
REBIND_REASONS: Final[tuple[RebindReason, ...]] = get_args(RebindReason)
NOTIFY_OPS: Final[tuple[NotifyOp, ...]] = get_args(NotifyOp)
REJECT_REASONS: Final[tuple[RejectReason, ...]] = get_args(RejectReason)
SPILL_REASONS: Final[tuple[SpillReason, ...]] = get_args(SpillReason)
FANOUT_DIRECTIONS: Final[tuple[FanoutDirection, ...]] = get_args(FanoutDirection)
FANOUT_REASONS: Final[tuple[FanoutReason, ...]] = get_args(FanoutReason)
KEY_LOOKUP_REASONS: Final[tuple[KeyLookupReason, ...]] = get_args(KeyLookupReason)
KEY_REFUSALS: Final[tuple[KeyRefusal, ...]] = get_args(KeyRefusal)
KEY_EVENT_OPS: Final[tuple[KeyEventOp, ...]] = get_args(KeyEventOp)
LIMIT_KINDS: Final[tuple[LimitKind, ...]] = get_args(LimitKind)
STRATEGY_NAMES: Final[tuple[StrategyName, ...]] = get_args(StrategyName)
BACKEND_KINDS: Final[tuple[BackendKind, ...]] = get_args(BackendKind)
CACHE_KINDS: Final[frozenset[BackendKind]] = frozenset(("vllm", "llamacpp"))
"""The engines affinity serves: a prefix cache, load on /metrics, usage asked for."""
BACKEND_STATES: Final[tuple[BackendState, ...]] = get_args(BackendState)
MOVE_REASONS: Final[tuple[MoveReason, ...]] = get_args(MoveReason)
EVICT_REASONS: Final[tuple[EvictReason, ...]] = get_args(EvictReason)
RESYNC_MODES: Final[tuple[ResyncMode, ...]] = get_args(ResyncMode)
DB_OPERATIONS: Final[tuple[DbOperation, ...]] = get_args(DbOperation)
LEDGER_OUTCOMES: Final[tuple[LedgerOutcome, ...]] = get_args(LedgerOutcome)
LEDGER_DROPS: Final[tuple[LedgerDrop, ...]] = get_args(LedgerDrop)

HEADER_OF: Final[dict[Outcome, AffinityHeader]] = {
    "hit": "hit",
    "rebind": "rebind",
    "degraded": "degraded",
    "created": "miss",
    "found_in_db": "miss",
    "found_after_lock": "miss",
}
"""The header a request gets for each engine outcome (a spill or bypass is the router's)."""
