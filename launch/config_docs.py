"""Render ``docs/configs.md`` (every config field, its default, flags and meaning) from the config dataclasses.

python launch/config_docs.py --write     # rewrite the page
python launch/config_docs.py --check     # exit 1 when it is stale
"""

from __future__ import annotations

import sys

from dvg_dist.runtime.config_docs import main

if __name__ == "__main__":
    sys.exit(main())
