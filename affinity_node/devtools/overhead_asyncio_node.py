"""`affinity-node` on the default asyncio loop, for the uvloop comparison of the overhead
benchmark (the shipped node runs uvloop where installed).

    python -m affinity_node.devtools.overhead_asyncio_node serve --config node.yaml
"""

from __future__ import annotations

import os
import sys

from affinity_node.cli import EVENT_LOOP_ENV, main

if __name__ == "__main__":
    os.environ[EVENT_LOOP_ENV] = "asyncio"
    raise SystemExit(main(sys.argv[1:]))
