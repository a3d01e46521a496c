"""Speed and memory of every STEREO phase, ours vs a plain reference loop: `python -m benchmarks.speed --help`.

workload (settings, inputs) → reference (the plain loops) and ours (stereo's trainer, inversion, generation)
→ cases (the registry, one measurement) → isolation (a process per measurement, torchrun scaling)
→ report (Markdown) → cli.
"""
