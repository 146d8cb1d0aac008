"""``python -m mmjax ...`` runs the command line (see :mod:`mmjax.cli`)."""

import sys

from mmjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
