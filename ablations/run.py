"""Train and evaluate one DANet ablation cell.

    python ablations/run.py --pam --no-cam                 # the demo preset: CPU, synthetic data
    python ablations/run.py --config camvid --data-root /data/camvid --seed 1
    python ablations/run.py --help                         # every flag
"""

import sys

from danet.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
