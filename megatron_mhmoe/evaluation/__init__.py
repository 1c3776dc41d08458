"""Using a trained model: sampling text from a native export (generate), lm-eval-harness runs on a transformers
export (harness, with the offline output handling in progress) and the two local tasks shipped in
tools/eval_tasks/ (tasks). The commands are tools/generate.py, tools/evaluate.py and tools/build_eval_task.py."""
