"""``python -m bitcliff``: the ``bitcliff`` command (what ``torchrun ... -m bitcliff`` starts)."""

import sys

from bitcliff.cli import main

sys.exit(main())
