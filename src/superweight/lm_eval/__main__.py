"""``python -m superweight.lm_eval``: lm-evaluation-harness's CLI with the superweight models."""

import sys

from superweight.lm_eval import main

if __name__ == "__main__":
    sys.exit(main())
