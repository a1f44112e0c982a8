"""`python -m hf_eagle3`: the `hf-eagle3` command line."""

import sys

from .cli import main

sys.exit(main())
