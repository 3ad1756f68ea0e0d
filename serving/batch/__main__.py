"""`python -m serving.batch MANIFEST ...` (also as `ray job submit -- python -m serving.batch ...`):
see `serving.batch.cli` and docs/batch.md; design: docs/design/batch.md."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
