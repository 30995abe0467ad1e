"""A trainer run with a fault injected from outside the trainer; run by tests/test_faults.py.

    python fault_run.py FAULT ARG TRAINER.py ARGS...

The trainer itself runs unchanged, as `python TRAINER.py ARGS...`, with one fault:
    nan STEPS     every loss that the training steps STEPS (1-based, comma-separated, e.g. "2,4,5")
                  back-propagate is multiplied by NaN before its backward: NaN gradients
    full -        the disk is full: every os.fsync fails with ENOSPC (as with delayed allocation)
    savefail N    writing checkpoint N fails with ENOSPC half-way (its model is written, its
                  trainer state is not); N@R: on rank R alone (under torchrun)
"""
import errno
import os
import runpy
import sys

import torch


def enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def main():
    fault, arg, script, *args = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    import common

    if fault == "nan":
        poisoned, current = {int(s) for s in arg.split(",")}, [0]
        progress, backward = common.Run.progress, torch.Tensor.backward

        def tracked(run):  # the training step the loop is in (1-based)
            for step in progress(run):
                current[0] = step + 1
                yield step

        def poison(loss, *a, **k):
            return backward(loss * float("nan") if current[0] in poisoned else loss, *a, **k)

        common.Run.progress, torch.Tensor.backward = tracked, poison
    elif fault == "full":
        def fsync(fd):
            raise enospc(None)
        os.fsync = fsync
    elif fault == "savefail":
        step, _, only = arg.partition("@")
        save, target = torch.save, f"checkpoint-{int(step):06d}.tmp"
        here = not only or os.environ.get("RANK", "0") == only

        def failing(obj, f, *a, **k):
            if here and isinstance(f, str) and target in f:
                raise enospc(f)
            return save(obj, f, *a, **k)
        torch.save = failing
    else:
        raise SystemExit(f"unknown fault {fault}")
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":  # grading workers run this file's top level as they start
    main()
