"""``python -m bastion.cli``: the ``bastion`` command (as ``torchrun -m bastion.cli train ...`` needs)."""

import sys

from bastion.cli import main

sys.exit(main())
