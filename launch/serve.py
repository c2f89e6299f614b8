"""Serve DVG video generation over HTTP: a Ray Serve application whose replicas are sequence-parallel groups
(docs/serve.md). POST /v1/videos returns a job id; poll GET /v1/videos/<id>; fetch GET /v1/videos/<id>/content.

python launch/serve.py --config configs/tiny-wan.yaml --model build/tiny-wan --port 8000 --out out/serve
python launch/serve.py --config configs/wan2.1-t2v-14b.yaml --model /ckpt --nproc 8 --address auto --host 0.0.0.0
serve run configs/serve-tiny-wan.yaml        # the same application from a Serve config file
"""

import sys

from dvg_dist.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
