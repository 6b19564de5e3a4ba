"""`tapper plan`: the memory each stage needs on one accelerator, from the real modules built on the meta device.

backbones.py  the backbone's config without its weights (tiny, smollm2, the paper's backbones by hub id)
saved.py      activation bytes: the real forward run on meta tensors, every tensor autograd keeps counted
plan.py       weights, gradients, optimizer state, activations (with and without checkpointing), the largest
              micro-batch that fits
workload.py   a synthetic Stage-1/Stage-2 training workload on a random-init backbone (measure.py, bench/throughput.py)
measure.py    the same step's peak memory measured on the CPU (peak RSS in a subprocess), to check the plan
cli.py        the command
"""
