"""Benchmarks of stereo: speed and memory of every STEREO phase against plain reference loops.

Run from the repository root (each writes its results under benchmarks/results):

  python -m benchmarks.speed --model tiny          # seconds per step and peak memory, ours vs a reference loop
  python -m benchmarks.erase_step --model tiny     # the ESD erase step of the above alone
  python -m benchmarks.memory                      # peak GPU memory per phase on SD 1.4, traced on meta tensors

`harness` holds what they share (loading a base model, device sync, memory probes, the machine).
"""
