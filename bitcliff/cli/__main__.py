"""``python -m bitcliff.cli``: the same as the ``bitcliff`` command."""

import sys

from bitcliff.cli import main

sys.exit(main())
