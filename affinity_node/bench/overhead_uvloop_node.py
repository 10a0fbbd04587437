"""`affinity-node` under uvloop, for the uvloop comparison of the overhead benchmark.

    python -m affinity_node.bench.overhead_uvloop_node serve --config node.yaml

`cli.main()` runs `asyncio.run` on the default loop; setting the policy first is the whole
difference, so the two runs compare the event loop and nothing else.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from affinity_node.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    raise SystemExit(main(sys.argv[1:]))
