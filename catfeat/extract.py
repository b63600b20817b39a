"""`python -m catfeat.extract ...`: the same as `catfeat extract ...` (the command lives in :mod:`catfeat.cli.extract`)."""
import sys

if __name__ == "__main__":
    from catfeat.cli.extract import main

    sys.exit(main(sys.argv[1:]))
