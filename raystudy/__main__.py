import sys

from raystudy.cli import main

sys.exit(main())
