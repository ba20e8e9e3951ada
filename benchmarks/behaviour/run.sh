#!/usr/bin/env bash
# usage: benchmarks/behaviour/run.sh REPO OUT: the behaviour checks of a refactor (the MoG demo, reduced
# MNIST rotate runs of the MetaVAE and the VHE), one thread. Run it in a worktree of each commit, then
#   python benchmarks/behaviour/compare.py OUT_BEFORE OUT_AFTER   (every metric value, exactly)
repo=$1; out=$(realpath -m $2); mkdir -p $out; cd $repo
export OMP_NUM_THREADS=1
for m in metavae vhe; do
  .venv/bin/metavae run mnist-rotate --model $m --preset quick --set train_images=300 --set test_images=100 --set epochs=2 \
     --data-dir ${MNIST:-../shared/data/mnist} --out $out/mnist-$m --quiet > $out/mnist-$m.log 2>&1
done
.venv/bin/metavae run mog --out $out/mog > $out/mog.log 2>&1
echo done > $out/DONE
