"""``python -m lorafit`` (and ``torchrun -m lorafit``): the command line."""

from lorafit.cli import main

raise SystemExit(main())
