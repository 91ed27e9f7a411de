"""MTKDAgent, its state, reward, update loss and replay buffer against the float64 reference
(docs/method.md sections 4-6)."""

import pytest
import torch

from mtkd_fast.agent import (
    AgentReplayBuffer,
    AgentState,
    MTKDAgent,
    buffer_storage_nbytes,
    list_storage_nbytes,
    make_state,
    normalized_reward,
)


def random_state(B=7, M=3, K=11, dims=(5, 9, 6), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(M, B, K, generator=g, dtype=dtype) * 2
    emb = [torch.randn(B, d, generator=g, dtype=dtype) for d in dims]
    kl = torch.rand(B, M, generator=g, dtype=dtype) * 3
    tce = torch.rand(B, M, generator=g, dtype=dtype) * 4
    cos = torch.rand(B, M, generator=g, dtype=dtype) * 2 - 1
    return make_state(cos, kl, tce, emb, zt), [d + K + 3 for d in dims]


def test_state_layout_matches_reference():
    g = torch.Generator().manual_seed(1)
    B, M, K = 5, 3, 7
    zt = torch.randn(M, B, K, generator=g)
    emb = [torch.randn(B, 4 + m, generator=g) for m in range(M)]
    kl, tce, cos = (torch.rand(B, M, generator=g) for _ in range(3))
    st = make_state(cos, kl, tce, emb, zt)
    # per teacher m the block (cos, kl, tce, e_m, z_m), written out from docs/method.md section 4
    expect = torch.cat([torch.cat([cos[:, m:m + 1], kl[:, m:m + 1], tce[:, m:m + 1], emb[m], zt[m]], 1)
                        for m in range(M)], 1)
    assert torch.equal(st.features, expect)
    # teacher 1's block starts after teacher 0's (D_0 + K + 3) columns: (cos, kl, tce, e_1, z_1)
    o = 4 + K + 3
    assert torch.equal(st.features[:, o], cos[:, 1]) and torch.equal(st.features[:, o + 1], kl[:, 1])
    assert torch.equal(st.features[:, o + 2], tce[:, 1]) and torch.equal(st.features[:, o + 3:o + 8], emb[1])
    assert torch.equal(st.features[:, o + 8:o + 8 + K], zt[1])


@pytest.mark.parametrize("dynamic", [False, True])
def test_agent_action_blends_policy_and_priors(dynamic):
    torch.manual_seed(0)
    state, sizes = random_state()
    agent = MTKDAgent(sizes, 3, dynamic=dynamic).double()
    if dynamic:
        with torch.no_grad():
            agent.logit_weight_factor.copy_(torch.tensor([0.3, -1.0, 2.0]))
            agent.feature_weight_factor.copy_(torch.tensor([1.5, 0.2, -0.7]))
    wl, wf = agent(state)
    h = torch.relu(state.features @ agent.steam[0].weight.T)
    pi_l = torch.softmax(h @ agent.logit_head.weight.T + agent.logit_head.bias, 1)
    pi_f = torch.softmax(h @ agent.feature_head.weight.T + agent.feature_head.bias, 1)
    torch.testing.assert_close(wl.sum(1), torch.ones(7, dtype=torch.float64))
    # the blend and the priors, written out from docs/method.md section 4
    c = (1 - torch.softmax(state.teacher_ce, 1)) / 2
    gl, gf = torch.softmax(state.kl, 1), torch.softmax(state.cos, 1)
    if dynamic:
        a_l = torch.softmax(agent.logit_weight_factor.detach(), 0)
        a_f = torch.softmax(agent.feature_weight_factor.detach(), 0)
    else:
        a_l = a_f = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(wl, a_l[0] * pi_l + a_l[1] * c + a_l[2] * gl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wf, a_f[0] * pi_f + a_f[1] * c + a_f[2] * gf, rtol=1e-12, atol=1e-12)


def test_parameter_names_load_authors_checkpoint():
    sizes = [64 + 100 + 3, 256 + 100 + 3]
    agent = MTKDAgent(sizes, 2, dynamic=True)
    shapes = {k: tuple(v.shape) for k, v in agent.state_dict().items()}
    assert shapes == {
        "steam.0.weight": (128, sum(sizes)),
        "logit_head.weight": (2, 128), "logit_head.bias": (2,),
        "feature_head.weight": (2, 128), "feature_head.bias": (2,),
        "logit_weight_factor": (3,), "feature_weight_factor": (3,),
    }
    torch.testing.assert_close(agent.logit_weight_factor.detach(), torch.ones(3))
    # an authors'-style checkpoint (same names, other values) loads strictly
    g = torch.Generator().manual_seed(3)
    theirs = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    agent.load_state_dict(theirs)
    assert torch.equal(agent.steam[0].weight, theirs["steam.0.weight"])
    assert set(MTKDAgent(sizes, 2).state_dict()) == set(shapes) - {"logit_weight_factor", "feature_weight_factor"}


@pytest.mark.parametrize("dynamic", [False, True])
def test_bce_loss_and_gradient_match_reference(dynamic):
    torch.manual_seed(1)
    state, sizes = random_state(seed=4)
    agent = MTKDAgent(sizes, 3, dynamic=dynamic).double()
    reward = normalized_reward(torch.randn(7, dtype=torch.float64))
    loss = agent.loss(state, reward)
    wl, wf = agent(state)
    r = reward.unsqueeze(1)
    expected = (-r * wl.log()).mean() + (-r * wf.log()).mean()
    torch.testing.assert_close(loss, expected)
    # torch's BCE toward 1 with per-sample weights r_hat, as the authors' agent loss
    ones = torch.ones_like(wl)
    torch.testing.assert_close(loss, torch.nn.functional.binary_cross_entropy(wl, ones, weight=r.expand_as(wl))
                               + torch.nn.functional.binary_cross_entropy(wf, ones, weight=r.expand_as(wf)))
    g1 = torch.autograd.grad(loss, list(agent.parameters()))
    g2 = torch.autograd.grad(expected, list(agent.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert any(float(g.abs().sum()) > 0 for g in g1)


def test_normalized_reward_has_no_data_dependent_branch():
    # The trainer's reward must not read the std back to the host (a device sync every step): tracing with fake
    # tensors fails on any data-dependent branch such as `if std > 0`.
    from torch.fx.experimental.proxy_tensor import make_fx

    make_fx(normalized_reward, tracing_mode="fake")(torch.randn(13))
    g = torch.Generator().manual_seed(5)
    r = normalized_reward(torch.randn(50, generator=g))
    assert float(r.min()) >= 0 and float(r.max()) <= 1 and float(r.max()) > 0
    assert torch.equal(normalized_reward(torch.full((6,), 2.5)), torch.zeros(6))


def test_policy_gradient_option():
    torch.manual_seed(2)
    state, sizes = random_state(seed=6)
    agent = MTKDAgent(sizes, 3, update="policy_gradient", concentration=30.0).double()
    a_l, a_f = agent.sample(state)
    torch.testing.assert_close(a_l.sum(1), torch.ones(7, dtype=torch.float64))
    reward = torch.rand(7, dtype=torch.float64)
    loss = agent.loss(state, reward, (a_l, a_f))
    wl, wf = agent(state)
    d_l = torch.distributions.Dirichlet(wl * 30.0)
    d_f = torch.distributions.Dirichlet(wf * 30.0)
    torch.testing.assert_close(loss, -(reward * (d_l.log_prob(a_l) + d_f.log_prob(a_f))).mean())
    loss.backward()
    assert agent.logit_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="actions"):
        agent.loss(state, reward)
    # samples are centred on the deterministic action
    many = torch.stack([agent.sample(state)[0] for _ in range(400)]).mean(0)
    torch.testing.assert_close(many, wl.detach(), atol=0.03, rtol=0)


def test_replay_buffer_round_trip_and_dtypes():
    state, sizes = random_state(B=6, seed=7, dtype=torch.float32)
    small, _ = random_state(B=4, seed=8, dtype=torch.float32)
    width = sum(sizes)
    buf = AgentReplayBuffer(3, 6, width, 3)
    r1, r2 = torch.rand(6), torch.rand(4)
    buf.append(state, r1)
    buf.append(small, r2)
    assert len(buf) == 2
    items = list(buf)
    assert torch.equal(items[0][0].features, state.features) and torch.equal(items[0][1], r1)
    assert items[1][0].features.shape == (4, width) and torch.equal(items[1][0].kl, small.kl)
    assert torch.equal(items[1][0].cos, small.cos) and torch.equal(items[1][0].teacher_ce, small.teacher_ce)
    buf.clear()
    assert len(buf) == 0 and list(buf) == []
    half = AgentReplayBuffer(3, 6, width, 3, dtype=torch.bfloat16)
    half.append(state, r1)
    got = next(iter(half))[0].features
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, state.features, rtol=1e-2, atol=1e-2)
    assert half.nbytes < buf.nbytes
    assert buf.nbytes == buffer_storage_nbytes(3, 6, [s - 11 - 3 for s in sizes], 11)
    full = AgentReplayBuffer(1, 6, width, 3)
    full.append(state, r1)
    with pytest.raises(ValueError, match="full"):
        full.append(state, r1)
    with pytest.raises(ValueError, match="state.features"):
        AgentReplayBuffer(2, 3, width, 3).append(state, r1)


def test_storage_estimates():
    # CIFAR-100 (4 teachers, K=100, B=64, one epoch of 782 steps): bf16 features save well over half
    dims = [440, 400, 256, 256]
    lst = list_storage_nbytes(782, 64, dims, 100)
    bf16 = buffer_storage_nbytes(782, 64, dims, 100, torch.bfloat16)
    assert bf16 < 0.55 * lst
    assert buffer_storage_nbytes(782, 64, dims, 100) < lst


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_teachers"):
        MTKDAgent([10], 1)
    with pytest.raises(ValueError, match="input_sizes"):
        MTKDAgent([10, 10], 3)
    with pytest.raises(ValueError, match="update"):
        MTKDAgent([10, 10], 2, update="ppo")
    agent = MTKDAgent([10, 10], 2)
    bad = AgentState(torch.zeros(3, 19), torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="state.features"):
        agent(bad)
