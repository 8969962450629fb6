import sys

from labelmill.cli import main

sys.exit(main())
