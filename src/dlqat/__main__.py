import sys

from dlqat.cli import main

sys.exit(main())
