"""`python -m executor_service serve ...` (same as the `trainium-executor` console script)."""

import sys

from executor_service.cli import main

sys.exit(main())
