"""``python -m lynx.deploy generate [--check]``: see `lynx.deploy.generate`."""

import sys

from lynx.deploy.generate import main

sys.exit(main())
