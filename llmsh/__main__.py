"""`python -m llmsh …` is the same as the `llmsh` console script."""

import sys

from llmsh.cli import main

sys.exit(main())
