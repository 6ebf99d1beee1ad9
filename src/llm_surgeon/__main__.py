"""``python -m llm_surgeon``: the same as the ``llm-surgeon`` command."""

import sys

from llm_surgeon.cli import main

sys.exit(main())
