"""`python -m lcplug ...` (and `accelerate launch -m lcplug train ...`): the same CLI as the `lcplug` script."""

import sys

from lcplug.cli import main

if __name__ == "__main__":
    sys.exit(main())
