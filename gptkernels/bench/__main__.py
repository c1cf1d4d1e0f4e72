import sys

from gptkernels.cli import main

# Through the package CLI, so `python -m gptkernels.bench` gets the same start-up (threads, backend check) as
# `python -m gptkernels bench`.
raise SystemExit(main(["bench", *sys.argv[1:]]))
