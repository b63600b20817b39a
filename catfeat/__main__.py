"""`python -m catfeat COMMAND ...`: the same as the `catfeat` command."""
import sys

from catfeat.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
