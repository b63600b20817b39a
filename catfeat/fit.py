"""`python -m catfeat.fit ...`: the same as `catfeat fit ...` (the command lives in :mod:`catfeat.cli.fit`)."""
import sys

if __name__ == "__main__":
    from catfeat.cli.fit import main

    sys.exit(main(sys.argv[1:]))
