"""The command line: one module per command (argparse, printing, exit codes) and the `catfeat` dispatcher."""
