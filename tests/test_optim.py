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
        return out

    theirs_name = "constant_with_warmup" if name == "constant" and warmup else name
    theirs = lrs(lambda o: get_scheduler(theirs_name, o, num_warmup_steps=warmup, num_training_steps=total))
    assert lrs(lambda o: build_scheduler(o, name, warmup, total)) == theirs


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup"])
def test_a_checkpoint_of_either_schedule_resumes_the_other(name, tmp_path):
    """A run checkpointed when schedules came from transformers resumes on lorafit's, and the other way round:
    the state dict survives torch.save / torch.load(weights_only=True) and the learning rates go on equal."""
    from transformers import get_scheduler

    def make(ours):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, (build_scheduler(opt, name, 4, 20) if ours else
                     get_scheduler(name, opt, num_warmup_steps=4, num_training_steps=20))

    for saved_by_ours in (False, True):
        opt, sched = make(saved_by_ours)
        for _ in range(7):
            opt.step()
            sched.step()
        torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ckpt.pt")
        state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        opt2, sched2 = make(not saved_by_ours)
        opt2.load_state_dict(state["opt"])
        sched2.load_state_dict(state["sched"])
        for _ in range(16):
            assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
            for o, s in ((opt, sched), (opt2, sched2)):
                o.step()
                s.step()
