"""Generate videos with DVG on a diffusers checkpoint, on one process or many.

python launch/generate.py --config configs/tiny-wan.yaml --prompt "a red ball" --budget 0.5 --out out/
python launch/generate.py --nproc 2 --config configs/tiny-wan.yaml --prompt "a red ball" --out out/
torchrun --nproc_per_node 8 launch/generate.py --config configs/wan2.1-t2v-14b.yaml --prompt "..." --out out/
"""

import sys

from dvg_dist.executors.local import main

if __name__ == "__main__":
    sys.exit(main())
