"""`python -m agentnode` is the `agentnode` command."""

import sys

from agentnode.cli import main

sys.exit(main())
