import sys

from pocketflow.cli import main

sys.exit(main())
