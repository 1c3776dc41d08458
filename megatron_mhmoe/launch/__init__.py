"""Launch side, separate from the trainer: the training command line (cli), the pre-launch check
(launch_check), hostfiles and resource filters (hostfile), and the launch wrapper that relays the ranks'
output and ends a failed run with one line (proctree)."""
