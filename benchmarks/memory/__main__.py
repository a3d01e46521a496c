import sys

from benchmarks.memory.cli import main

if __name__ == "__main__":
    sys.exit(main())
