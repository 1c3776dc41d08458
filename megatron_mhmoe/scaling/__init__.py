"""Expert-scaling sweeps (issue 7): Dense vs SMoE/X-MoE vs MH-MoE from 8 to 256 experts.

One concept per file:
  spec.py      SweepSpec: the sweep preset (axes, base run config, machines, wandb)
  matching.py  the model of one grid point: Dense / SMoE / fine-grained SMoE / MH-MoE sized by parameter
               matching (arXiv 2404.15045) or FLOPs-and-parameter matching (arXiv 2411.16205)
  plan.py      the run list: names, tags, EP size, nodes, experts per rank, memory estimate per rank
  results.py   reading a finished run (metrics.jsonl, moe_stats.json) and results.jsonl (resume)
  runner.py    writing run configs, launching runs (local process / torchrun / multi-node deepspeed)
  report.py    tables over seeds (mean +- std)
  plots.py     the paper's figures (matplotlib Agg) and the wandb summary run
  commands.py  what each subcommand of the CLI (tools/scaling.py) does
"""
