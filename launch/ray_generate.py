"""Generate a batch of videos with DVG on a Ray cluster: one actor per rank, ``--workers N --sp K`` gives
N/K sequence-parallel groups, data-parallel over the requests. Re-running the same command resumes.

python launch/ray_generate.py --config configs/tiny-wan.yaml --prompts prompts.jsonl --workers 2 --sp 2 --out out/
ray job submit --working-dir . -- python launch/ray_generate.py --config ... --prompts ... --out /abs/out
"""

import sys

from dvg_dist.executors.ray_executor import main

if __name__ == "__main__":
    sys.exit(main())
