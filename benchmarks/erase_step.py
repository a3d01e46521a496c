"""Seconds per erase step and peak memory: stereo's trainer vs a plain reference loop (fp32,
batch 1, one UNet call per prompt), same run, printed as a ratio. A shortcut for
`python -m benchmarks.speed --phases esd` (see there for all phases and options).

  python -m benchmarks.erase_step --model tiny
  python -m benchmarks.erase_step --model sd14-random --batch 4 --precision bf16 --gc   # GPU
"""

import sys

from benchmarks.speed.cli import main

if __name__ == "__main__":
    main(["--phases", "esd", *sys.argv[1:]])
