"""The demo's scenarios: which columns run, the workload's shape and the simulated GPUs.

- `chat`: 40 equally busy tenants, each well within one backend; the columns compare affinity
  off, node-local affinity and shared affinity (prefix-cache reuse is the point).
- `skew`: Zipf tenant popularity where the top tenant needs more than one backend; the
  columns compare affinity off, shared affinity pinned to one backend per pair
  (`max_fanout: 1`) and shared affinity that may fan a pair out over several (`max_fanout:
  4`). Open-loop arrivals at a fraction of the fleet's capacity, derived from the backend
  model below; a warm-up before each measured part lets bindings and caches settle.
- `scale`: the chat workload while a backend joins and one drains (sim/scale.py).
- `agents`: coding-agent sessions on the Responses API (sim/agents.py), Zipf tenants; the
  columns compare a plain round-robin balancer straight in front of the backends (no node:
  a follow-up naming a stored response reaches its owner by luck only), shared affinity
  (`max_fanout: 1`) and shared affinity with fan-out (`max_fanout: 4`). Here `conversations`
  is the agent sessions per tenant, `max_turns` the turns of a chain, `system_tokens` the
  tenant's instructions and `output_tokens` each answer's `max_output_tokens`.

A scenario fixes defaults only: every figure can be overridden on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

from affinity_node.sim.capacity import CapacityModel
from affinity_node.sim.fleet import BackendModel, Scenario
from affinity_node.sim.workload import ROLE_TOKENS, WorkloadConfig

SCENARIO_NAMES: Final = ("chat", "skew", "scale", "agents", "db-failover", "noisy")


@dataclass(frozen=True)
class Preset:
    """A scenario's defaults."""

    name: str
    columns: tuple[Scenario, ...]
    keys: int
    conversations: int
    max_turns: int
    system_tokens: tuple[int, int]
    user_tokens: tuple[int, int]
    output_tokens: int
    duration_s: float
    warmup_s: float
    rate: float | None
    """Arrivals per second; None: `load` x the fleet's estimated capacity."""
    load: float
    zipf: float | None
    backend: BackendModel


CHAT: Final = Preset(
    name="chat",
    columns=(
        Scenario("off", "affinity off", {"enabled": False}),
        Scenario("node_local", "node-local affinity", {"enabled": True, "store": "memory"}),
        Scenario("shared", "shared affinity", {"enabled": True, "store": "postgres"}),
    ),
    keys=40,
    conversations=2,
    max_turns=16,
    system_tokens=(400, 700),
    user_tokens=(16, 40),
    output_tokens=32,
    duration_s=18.0,
    warmup_s=0.0,
    rate=50.0,
    load=0.0,
    zipf=None,
    # 10k prefill tokens/s per GPU (the compose file's figure): affinity off, which prefills
    # about five times the tokens shared affinity does, runs its backends at ~70%.
    backend=BackendModel(
        prefill_s_per_token=0.0001,
        ttft_base_s=0.01,
        tokens_per_s=2000.0,
        decode_slowdown=0.02,
        max_running=256,
    ),
)

SKEW: Final = Preset(
    name="skew",
    columns=(
        Scenario("off", "affinity off", {"enabled": False}),
        Scenario(
            "fanout1",
            "shared, max_fanout 1",
            {"enabled": True, "store": "postgres", "max_fanout": 1},
        ),
        Scenario(
            "fanout4",
            "shared, max_fanout 4",
            {"enabled": True, "store": "postgres", "max_fanout": 4},
        ),
    ),
    # Zipf 2.0 over 8 tenants: the top one draws 65% of the arrivals, 1.7 backends of load
    # at 65% of a 4-backend fleet; the next two 0.43 and 0.19 backends.
    keys=8,
    conversations=8,
    # Short conversations of many end users sharing the tenant's system prompt: most
    # prompt tokens are the shared prefix, and affinity off pays for the histories it loses.
    max_turns=3,
    system_tokens=(300, 500),
    user_tokens=(16, 40),
    output_tokens=32,
    duration_s=20.0,
    warmup_s=10.0,
    rate=None,
    load=0.65,
    zipf=2.0,
    # A slow GPU (1000 prefill tokens/s) so that capacity is reached at ~16 requests/s per
    # backend: the whole fleet, nodes and load generator fit on 2 cores.
    backend=BackendModel(
        prefill_s_per_token=0.001,
        ttft_base_s=0.01,
        tokens_per_s=1000.0,
        decode_slowdown=0.02,
        max_running=16,
    ),
)

# Fleet changes under the chat workload: the nodes' config lists all backends but the last
# (3 of 4 by default), which joins by `backends add` a third of the way through; the first is
# drained two thirds through (sim/scale.py). The same run without these events is the baseline.
_SCALE_NODES: Final = {
    "rebalance": {"enabled": True, "max_moves_per_minute": 60, "after_seconds": 5},
    "drain": {"moves_per_second": 2},
}
SCALE: Final = replace(
    CHAT,
    name="scale",
    columns=(
        Scenario("steady", "no scale events", {"enabled": True}, -1, _SCALE_NODES),
        Scenario("scale", "scale events", {"enabled": True}, -1, _SCALE_NODES),
    ),
    duration_s=90.0,
    warmup_s=5.0,
    rate=40.0,
)

# Agents: 4 tenants, Zipf 1.5 over 20 sessions (11 / 4 / 2 / 2... by popularity): the top
# tenant's sessions keep one backend hot, so fan-out grows its set. Long instructions, chains
# of 8 turns whose context grows by a tool output now and then. A GPU of 2000 prefill
# tokens/s and 8 running slots: a chain's next turn prefills ~100 new tokens on its owner,
# its whole context (1-3k tokens) anywhere else.
AGENTS: Final = Preset(
    name="agents",
    columns=(
        Scenario("off", "affinity off (plain LB)", {"enabled": False}, direct=True),
        Scenario(
            "shared", "shared affinity", {"enabled": True, "store": "postgres", "max_fanout": 1}
        ),
        Scenario(
            "fanout",
            "shared + fan-out",
            {"enabled": True, "store": "postgres", "max_fanout": 4},
        ),
    ),
    keys=4,
    conversations=5,
    max_turns=6,
    system_tokens=(1000, 1400),
    user_tokens=(20, 60),
    output_tokens=32,
    duration_s=20.0,
    warmup_s=5.0,
    rate=None,
    load=0.0,
    zipf=1.5,
    backend=BackendModel(
        prefill_s_per_token=0.0002,
        ttft_base_s=0.01,
        tokens_per_s=1000.0,
        decode_slowdown=0.02,
        max_running=8,
    ),
)

# db-failover (sim/db_failover.py): one column, shared affinity, 12 tenants in a closed loop
# on every node through a primary crash and its standby's promotion.
DB_FAILOVER: Final = replace(
    CHAT,
    name="db-failover",
    columns=(Scenario("shared", "shared affinity", {"enabled": True, "store": "postgres"}),),
    keys=12,
)

# One tenant floods at 3x the fleet's capacity (sim/noisy.py runs it: its own fleet and
# columns, fairness off / on / on with a limit on the flood key).
NOISY: Final = replace(
    CHAT,
    name="noisy",
    columns=(Scenario("shared", "shared affinity", {"enabled": True, "store": "postgres"}),),
    keys=8,
)

PRESETS: Final = {p.name: p for p in (CHAT, SKEW, SCALE, AGENTS, DB_FAILOVER, NOISY)}


def sticky_uncached_tokens(cfg: WorkloadConfig, block_size: int = 16) -> float:
    """Mean prompt tokens a request prefills when its conversation stays on one backend that
    already holds its tenant's system prompt: the new question, the previous answer (from the
    second turn), and on average half a block (only full blocks are cached)."""
    question = sum(cfg.user_tokens) / 2 + ROLE_TOKENS
    answer = cfg.max_tokens + ROLE_TOKENS
    turns = [question + block_size / 2] + [question + answer + block_size / 2] * (cfg.max_turns - 1)
    return sum(turns) / len(turns)


def backend_capacity_rps(model: CapacityModel, cfg: WorkloadConfig) -> float:
    """Requests per second one backend sustains at full utilisation, for this workload with
    affinity working (the cheapest placement): the smaller of its prefill compute (shared by
    all requests) and its slots (each held for prefill, first token and decode)."""
    uncached = sticky_uncached_tokens(cfg, model.block_size)
    prefill_s = model.prefill_s(round(uncached))
    by_prefill = 1.0 / prefill_s if prefill_s > 0 else float("inf")
    hold_s = (
        prefill_s
        + model.ttft_base_s
        + (cfg.max_tokens - 1) * model.decode_step_s(model.max_running)
    )
    by_slots = model.max_running / hold_s if hold_s > 0 else float("inf")
    return min(by_prefill, by_slots)


def backends_of_load(share: float, rate: float, capacity_rps: float) -> float:
    """How many backends a tenant drawing `share` of `rate` keeps fully busy."""
    return share * rate / capacity_rps
