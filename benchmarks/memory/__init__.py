"""Peak GPU memory of every STEREO phase on SD 1.4, estimated on a CPU: `python -m benchmarks.memory --help`.

memtrace (byte tracker, CUDA semantics, meta modules) → configs (what the estimate depends on) → trace (one
traced step, the breakdown of a peak, AdamW) → training / evaluation (each workload's step) → phases (every
phase of a run, resident tensors added) → report (tables, JSON, Markdown) → cli.
"""
