"""The DVG planner as a tool: step counts, the candidate table, the weights and the chosen action.

python launch/plan.py --grid 21x90x160 --steps 50 --budget 0.5 --spatial-multiple 2 --synthetic-sketch 0 [--json]
"""

import sys

from dvg_dist.runtime.plan_cli import main

if __name__ == "__main__":
    sys.exit(main())
