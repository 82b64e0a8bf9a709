"""`python -m data.pipeline ...`: see run.main and data/pipeline/README.md."""
import sys

from .run import main

sys.exit(main())
