#!/usr/bin/env bash
# Issue 27's measurements: `metavae evaluate` on two real families the project did not make, and one
# `train` epoch on 10,000 MNIST digits. Run from a scratch folder, e.g.
#   mkdir /tmp/m && cd /tmp/m && /path/to/metavae/.venv/bin/pip install palmerpenguins && bash /path/to/run.sh /path/to/metavae
# make_data.py writes digits_{train,unseen}.csv (sklearn's load_digits: 4 seen transforms of images 0-1199,
# 2 unseen transforms of images 1200-1796, label = digit) and penguins_{train,unseen}.csv (palmerpenguins,
# distribution = island_year: 2007/2008 seen, 2009 unseen, label = species).
set -euo pipefail
REPO=${1:-$(cd "$(dirname "$0")/../.." && pwd)}
M=$REPO/.venv/bin/metavae
export OMP_NUM_THREADS=1
"$REPO/.venv/bin/python" "$REPO/benchmarks/own_data/make_data.py"
$M train --data penguins_train.csv --dist-column group --label-column species --out peng-run --set epochs=200 \
  --set patience=30 --set context_size=4 --set val_fraction=0.3 --quiet
$M evaluate --model peng-run/model.pt --data penguins_unseen.csv --dist-column group --label-column species --out peng-eval --quiet
$M train --data penguins_train.csv --dist-column group --label-column species --out peng-vhe --model vhe --set epochs=200 \
  --set patience=30 --set context_size=4 --set val_fraction=0.3 --quiet
$M evaluate --model peng-vhe/model.pt --data penguins_unseen.csv --dist-column group --label-column species --out peng-vhe-eval --quiet
$M train --data digits_train.csv --dist-column transform --label-column digit --out dig-run --set epochs=20 --quiet
$M evaluate --model dig-run/model.pt --data digits_unseen.csv --dist-column transform --label-column digit --out dig-eval --quiet
$M train --data digits_train.csv --dist-column transform --label-column digit --out dig-unit --set epochs=20 --set scale=unit --quiet
$M evaluate --model dig-unit/model.pt --data digits_unseen.csv --dist-column transform --label-column digit --out dig-unit-eval --quiet
"$REPO/.venv/bin/python" - <<'PY'
import numpy as np
from metavae.paper.data.mnist import read_idx
x = read_idx("/work/shared/data/mnist/train-images-idx3-ubyte.gz")[:10000]
y = read_idx("/work/shared/data/mnist/train-labels-idx1-ubyte.gz")[:10000]
np.savez("mnist10k.npz", **{f"digit{d}": x[y == d] for d in range(10)})
PY
/usr/bin/time -v $M train --data mnist10k.npz --out mnist-run --set epochs=1 --quiet
