import sys

from jaxrlhf.cli import main

sys.exit(main())
