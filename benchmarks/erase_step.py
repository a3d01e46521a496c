"""Seconds per erase step and peak memory: stereo's trainer vs a plain reference loop (fp32,
batch 1, one UNet call per prompt), same run, printed as a ratio. A shortcut for
`benchmarks/speed.py --phases esd` (see there for all phases and options).

  python benchmarks/erase_step.py --model tiny
  python benchmarks/erase_step.py --model sd14-random --batch 4 --precision bf16 --gc   # GPU
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import main  # noqa: E402

if __name__ == "__main__":
    main(["--phases", "esd", *sys.argv[1:]])
