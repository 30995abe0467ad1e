"""A trainer run with a fault injected from outside the trainer; run by tests/test_faults.py.

    python fault_run.py nan STEPS TRAINER.py ARGS...

nan: every loss that training step STEPS (1-based, comma-separated, e.g. "2,4,5") back-propagates is
multiplied by NaN before its backward, so its gradients are NaN, as a numerically broken step's are. The
trainer itself runs unchanged, as `python TRAINER.py ARGS...`.
"""
import os
import runpy
import sys

import torch


def main():
    fault, steps, script, *args = sys.argv[1:]
    assert fault == "nan", fault
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    import common

    poisoned, current = {int(s) for s in steps.split(",")}, [0]
    progress, backward = common.Run.progress, torch.Tensor.backward

    def tracked(run):  # the training step the loop is in (1-based)
        for step in progress(run):
            current[0] = step + 1
            yield step

    def poison(loss, *a, **k):
        return backward(loss * float("nan") if current[0] in poisoned else loss, *a, **k)

    common.Run.progress, torch.Tensor.backward = tracked, poison
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":  # grading workers run this file's top level as they start
    main()
