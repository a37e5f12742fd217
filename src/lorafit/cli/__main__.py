"""``python -m lorafit.cli``: the ``lorafit`` command, for environments without its script on PATH."""

import sys

from lorafit.cli import main

sys.exit(main())
