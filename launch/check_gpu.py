"""Real-size transformer architectures with random weights: per-stage step time, tokens per rank, memory and
DVG's speed-up over the full run (the command to run on a GPU machine).

python launch/check_gpu.py --family wan|wan-ti2v|hunyuan|hunyuan15|hunyuan15-distill|ltx|cogvideox --nproc N
    [--layers L] [--size WxH] [--json FILE]
"""

import sys

from dvg_dist.runtime.check_gpu import main

if __name__ == "__main__":
    sys.exit(main())
