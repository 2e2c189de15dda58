import sys

from confinfer.cli import main

sys.exit(main())
