"""`python -m effnet ...` (and `torchrun -m effnet train ...`) run the command line."""

import sys

from effnet.cli import main

sys.exit(main())
