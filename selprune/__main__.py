"""`python -m selprune ...` (e.g. under torchrun): the `selprune` command."""

import sys

from selprune.experiment.cli import main

sys.exit(main())
