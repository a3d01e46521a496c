"""Run an entry point as one rank of a launch, rank r starting r * 1.1 s late:

    torchrun --nproc_per_node 2 tests/scripts/staggered_entry.py train.py <overrides>

Each process composes its own config, so `output_dir: outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}`
resolves per process. On a real cluster ranks start up to seconds apart; the delay makes that
certain here (1.1 s crosses a second boundary), so a test sees whether the ranks still agree on one
output folder. The script then runs exactly as `python <script> <overrides>` would.
"""

import os
import runpy
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]  # the entry point sees its own argv and import path, as when run directly
    sys.path[0] = str(Path(script).resolve().parent)
    time.sleep(1.1 * int(os.environ.get("RANK", "0")))
    runpy.run_path(script, run_name="__main__")
