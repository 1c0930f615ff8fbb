import sys

from flyp.cli import main

sys.exit(main())
