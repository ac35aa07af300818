# The DenseDINO demo recipe for 30 epochs (1,500 iterations, about 16 min on 2 quiet CPU cores)
# instead of 6: the k-NN gain over random init grows with the budget, from +1.5 to +3.75 top-1
# points at 6 epochs to about +10 here (docs/benchmarks.md, "Longer runs"). The dense probe
# gains nothing at either budget.
_base_ = ["./densedino_vit-t_demo.py"]

train_cfg = dict(max_epochs=30)
default_hooks = dict(checkpoint=dict(interval=5, max_keep_ckpts=1))
