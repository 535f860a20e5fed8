"""The experiment service: a Ray Tune grid of backbone x paradigm x loss, every cell at the same FLOP budget.

grid       the cells, their configs, the sweep folder, trial resources and concurrency, shared preparation
cell       one cell's spec (config and plan) and its work, without Ray
tune       the Tune trainable, the FLOP stopper and the grid's Tuner
pretrain   the pre-training stages (MNTP, bag-of-words) run before the grid
console    the one-line progress console and where Tune's and the trials' output go
run        run_sweep: all of the above, then the report (`retriever.report`)
"""
