"""Evaluation entry point. Not implemented yet: it says so and exits non-zero rather than pretend."""

import sys

if __name__ == "__main__":
    sys.exit("evaluate.py: evaluation (attacks, ASR, CLIP score, FID) is not implemented yet; see the "
             "open evaluation issue. Nothing was evaluated.")
