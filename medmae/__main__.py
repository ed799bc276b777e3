import sys

from medmae.cli import main

sys.exit(main())
