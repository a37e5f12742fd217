"""The learning-rate schedules: transformers' own (``get_scheduler``) is the oracle."""

import pytest
import torch

from lorafit.train.optim import build_scheduler


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 10), (3, 10), (8, 60), (10, 10), (12, 10)])
def test_schedules_equal_transformers(name, warmup, total):
    from transformers import get_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = make(opt)
        out = []
        for _ in range(total + 3):  # past the end too
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, sched

    theirs_name = "constant_with_warmup" if name == "constant" and warmup else name
    theirs, their_sched = lrs(lambda o: get_scheduler(theirs_name, o, num_warmup_steps=warmup, num_training_steps=total))
    ours, our_sched = lrs(lambda o: build_scheduler(o, name, warmup, total))
    assert ours == theirs
    # a checkpoint's scheduler state loads into either
    our_sched.load_state_dict(their_sched.state_dict())
    their_sched.load_state_dict(our_sched.state_dict())
