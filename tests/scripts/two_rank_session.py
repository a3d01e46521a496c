"""Run by tests/test_train.py under `torchrun --nproc_per_node 2`: what must be one thing across processes.

Each process builds a RunContext whose output_dir contains `${now:...}` (resolved per process, to the
microsecond) and reads REO's anchors from its own file (standing in for an LLM that answers each
request differently); it writes what it ended up with to <out>/rank<r>.json.
"""

import json
import os
import sys
from pathlib import Path

from stereo.config import compose
from stereo.erasure.context import RunContext
from stereo.recipes.stereo import reo_anchors

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
anchors_file = out / f"anchors_rank{rank}.txt"
anchors_file.write_text(f"a quiet village street seen by process {rank}\n")
cfg = compose(["model=tiny", "method=reo", "concept=church", "trainer.cpu=true",
               f"concepts.church.anchors={anchors_file}"])
cfg.output_dir = str(out / "run_${now:%H-%M-%S-%f}")
with RunContext(cfg) as ctx:
    report = {"output_dir": str(ctx.output_dir), "config_output_dir": cfg.output_dir,
              "anchors": reo_anchors(ctx), "num_processes": ctx.accelerator.num_processes}
(out / f"rank{rank}.json").write_text(json.dumps(report))
