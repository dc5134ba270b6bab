import pytest
import torch

from monquant.training.optim import Adam, StepDecay


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(5, 3, generator=g)),
        torch.nn.Parameter(torch.randn(4, generator=g)),
    ]


def test_adam_matches_torch_adam():
    ours, ref = _params(), _params()
    opt = Adam(ours, lr=1e-2)
    topt = torch.optim.Adam(ref, lr=1e-2)
    sched, tsched = StepDecay(opt, 2, 0.1), torch.optim.lr_scheduler.StepLR(topt, 2, 0.1)
    g = torch.Generator().manual_seed(1)
    for _epoch in range(5):
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=g) for p in ours]
            for p, q, gr in zip(ours, ref, grads, strict=True):
                p.grad, q.grad = gr.clone(), gr.clone()
            opt.step()
            topt.step()
        sched.step()
        tsched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(topt.param_groups[0]["lr"])
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_state_roundtrip_continues_identically():
    a, b = _params(), _params()
    opt_a = Adam(a, lr=1e-2)
    for p in a:
        p.grad = torch.ones_like(p)
    opt_a.step()
    for p, q in zip(a, b, strict=True):
        q.data.copy_(p.data)
    opt_b = Adam(b, lr=5.0)
    opt_b.load_state_dict(opt_a.state_dict())
    sa, sb = StepDecay(opt_a, 1, 0.5), StepDecay(opt_b, 1, 0.5)
    sa.step()
    sb.load_state_dict(sa.state_dict())
    for opt, ps in ((opt_a, a), (opt_b, b)):
        for p in ps:
            p.grad = torch.full_like(p, 0.3)
        opt.step()
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    assert opt_b.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_parameters_without_gradient_are_left_alone():
    ps = _params()
    before = ps[1].detach().clone()
    opt = Adam(ps)
    ps[0].grad = torch.ones_like(ps[0])
    opt.step()
    assert torch.equal(ps[1].detach(), before) and 1 not in opt.state
    with pytest.raises(ValueError):
        Adam(ps, lr=0.0)


def test_adam_matches_torch_adam_when_step_counts_differ():
    """A parameter that went without a gradient for a step has its own step count: the grouped
    multi-tensor update gives each group its own bias correction, as torch.optim.Adam does."""
    ours, ref = _params(), _params()
    opt, topt = Adam(ours, lr=1e-2), torch.optim.Adam(ref, lr=1e-2)
    g = torch.Generator().manual_seed(2)
    for k in range(6):
        for i, (p, q) in enumerate(zip(ours, ref, strict=True)):
            gr = torch.randn(p.shape, generator=g) if (i == 0 or k % 2) else None
            p.grad, q.grad = gr, None if gr is None else gr.clone()
        opt.step()
        topt.step()
    assert float(opt.state[0]["step"]) == 6 and float(opt.state[1]["step"]) == 3
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_fused_and_multi_tensor_steps_agree(monkeypatch):
    """The fused kernel (where torch has one for the device) and the multi-tensor fallback compute
    the same update, step counts that differ between parameters included."""
    import monquant.training.optim as optim

    def run(fused: bool):
        if fused:  # found out afresh by the first step
            monkeypatch.delitem(optim._FUSED, ("cpu", torch.float32), raising=False)
        else:
            monkeypatch.setitem(optim._FUSED, ("cpu", torch.float32), False)
        ps = _params(3)
        opt = Adam(ps, lr=1e-2)
        g = torch.Generator().manual_seed(4)
        for k in range(5):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=g) if (i == 0 or k % 2) else None
            opt.step()
        return ps, opt

    fused, opt_f = run(True)
    if not optim._FUSED.get(("cpu", torch.float32)):
        pytest.skip("this torch has no fused Adam kernel for the CPU")
    plain, opt_p = run(False)
    for p, q in zip(fused, plain, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    for i in opt_f.state:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_f.state[i][key], opt_p.state[i][key], rtol=1e-6, atol=1e-9)
        assert float(opt_f.state[i]["step"]) == float(opt_p.state[i]["step"])
