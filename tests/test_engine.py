"""The collaborative engine: exactness of speculative methods, the chi-square test (and its own test), gates,
link accounting, and every method running end to end."""
from __future__ import annotations

import math

import pytest
import torch

from ciar.engine import LINKS, METHODS, collaborative_generate, get_method
from ciar.engine.gates import BudgetController, calibrate_tau
from ciar.engine.loop import LOCAL, PREFIX
from ciar.models import GPT, GPTConfig, SamplingConfig, build_device_model, model_probs
from ciar.models.generate import generate
from ciar.models.phi import IntervalProjection, PhiConfig
from conftest import randomise


def tiny(vocab: int = 48, block: int = 16, dim: int = 64, layers: int = 2):
    cfg = GPTConfig(dim=dim, n_layer=layers, n_head=4, vocab_size=vocab, block_size=block, model_type="t2i",
                    cls_token_num=4, caption_dim=24, multiple_of=32)
    cloud = randomise(GPT(cfg), seed=1, std=0.3)
    device = randomise(build_device_model(cfg, cloud=cloud), seed=2, std=0.3)
    return cloud, device


def conditions(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 24, generator=torch.Generator().manual_seed(seed))


def codebook(vocab: int, seed: int = 3) -> torch.Tensor:
    """A unit-norm VQ codebook (vocab, 8) for the latent gate."""
    return torch.nn.functional.normalize(torch.randn(vocab, 8, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _lossless(name: str):
    """`name` as a lossless method: ciar-chain with every draft uncertain verifies chains like sd."""
    return get_method(name, tau=-math.inf) if name == "ciar-chain" else get_method(name)


@pytest.mark.parametrize("name", ["sd", "ciar-lossless", "ciar-chain"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculative_methods_equal_cloud_tokens(name, batch):
    cloud, device = tiny()
    s = SamplingConfig(cfg_scale=3.0, temperature=0.0)
    cond = conditions(batch)
    base = collaborative_generate(METHODS["cloud"], cloud, device, cond, s, torch.Generator().manual_seed(0))
    ref = generate(cloud, cond, s, torch.Generator().manual_seed(0))
    out = collaborative_generate(_lossless(name), cloud, device, cond, s, torch.Generator().manual_seed(5))
    assert torch.equal(base.tokens, ref)
    assert torch.equal(out.tokens, base.tokens)


def _joint_cloud_distribution(cloud: GPT, cond: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Exact p(x0, x1) of the cloud's processed distribution for one condition (V x V)."""
    V, P = cloud.config.vocab_size, cloud.config.cls_token_num
    with torch.no_grad():
        doubled = cloud.cfg_condition(cond)
        p0 = model_probs(cloud(cond=doubled).logits[:, -1], s)[0]
        x0 = torch.arange(V)
        seqs = doubled.repeat_interleave(V, 0)
        logits = cloud(cond=seqs, tokens=x0.repeat(2)[:, None]).logits[:, -1]
        p1 = model_probs(torch.cat([logits[:V], logits[V:]]), s)
    return p0[:, None] * p1


def _chi_square_fails(counts: torch.Tensor, expected_p: torch.Tensor) -> bool:
    """True when the counts are implausible under expected_p (about 4.5 sigma on the chi-square statistic)."""
    n = counts.sum()
    exp = expected_p.flatten() * n
    obs = counts.flatten().double()
    keep = exp >= 5
    stat = float((((obs[keep] - exp[keep]) ** 2) / exp[keep]).sum()
                 + (obs[~keep].sum() - exp[~keep].sum()) ** 2 / max(float(exp[~keep].sum()), 1e-9))
    dof = int(keep.sum())
    return stat > dof + 4.5 * math.sqrt(2 * dof)


def _pair_counts(method, cloud, device, s, n: int, policy=None) -> tuple[torch.Tensor, torch.Tensor]:
    cond = conditions(1, seed=3)
    batch = cond.repeat(n, 1, 1)
    out = collaborative_generate(method, cloud, device, batch, s, torch.Generator().manual_seed(11), policy=policy)
    V = cloud.config.vocab_size
    counts = torch.bincount(out.tokens[:, 0] * V + out.tokens[:, 1], minlength=V * V).view(V, V)
    return counts, _joint_cloud_distribution(cloud, cond, s)


@pytest.mark.parametrize("lookahead", [0, 2])
@pytest.mark.parametrize("name", ["sd", "ciar-lossless", "ciar-chain"])
def test_sampling_methods_sample_the_cloud_distribution(name, lookahead):
    """Also when the device drafts on while a verification is in flight (lookahead > 0)."""
    import dataclasses

    cloud, device = tiny(vocab=6, block=4, dim=32, layers=2)
    s = SamplingConfig(cfg_scale=2.0, temperature=1.0)
    method = dataclasses.replace(_lossless(name), lookahead=lookahead)
    counts, p = _pair_counts(method, cloud, device, s, 6000)
    assert not _chi_square_fails(counts, p)
    # the test can fail: a wrong target (the device's own distribution) is rejected
    assert (p - p.mean()).abs().max() > 0.01


def test_chi_square_catches_a_broken_acceptance_rule():
    cloud, device = tiny(vocab=6, block=4, dim=32, layers=2)
    s = SamplingConfig(cfg_scale=2.0, temperature=1.0)

    def accept_everything(p, q, drafts, generator):
        from ciar.models.sampling import sample
        k = drafts.shape[1]
        return torch.full((drafts.shape[0],), k), sample(p[:, k], generator)

    counts, p = _pair_counts(get_method("sd"), cloud, device, s, 6000, policy=accept_everything)
    assert _chi_square_fails(counts, p)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_and_accounts(name):
    cloud, device = tiny()
    phi = IntervalProjection(PhiConfig(device.config.dim, 11, cloud.config.dim))
    neighbours = torch.stack([torch.roll(torch.arange(48), -i) for i in range(1, 6)], 1)
    s = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=20)
    method = get_method(name, tau=0.0 if name in ("entropy", "maxprob", "latent") else None)
    out = collaborative_generate(method, cloud, device, conditions(2), s, torch.Generator().manual_seed(0),
                                 phi=phi, neighbours=neighbours, link=LINKS["4g"], codebook=codebook(48))
    st = out.stats
    assert out.tokens.shape == (2, 16) and int(out.tokens.max()) < 48
    assert st["local"] + st["cloud"] == 16
    assert st["bytes_up"] > 0 and st["bytes_down"] > 0 and st["link_seconds"] >= 0.05
    if name == "device":
        assert st["local"] == 16 and st["cloud_calls"] == pytest.approx(1 / 16)
    if name == "cloud":
        assert st["cloud_calls"] == 1.0 and st["local"] == 0
    if name == "code30":
        assert int((out.source[0] == PREFIX).sum()) == int(0.3 * 16)
        assert bool((out.source[0, 4:] == LOCAL).all())


def test_same_seed_same_tokens_and_gate_threshold():
    cloud, device = tiny()
    s = SamplingConfig(cfg_scale=2.0)
    a = collaborative_generate(get_method("ciar", tau=0.01), cloud, device, conditions(1), s,
                               torch.Generator().manual_seed(4))
    b = collaborative_generate(get_method("ciar", tau=0.01), cloud, device, conditions(1), s,
                               torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens)
    drafted_u = a.u[0][~torch.isnan(a.u[0])]
    sent_u = a.u[0][a.sent[0]]
    assert bool((sent_u >= 0.01).all())
    never = collaborative_generate(get_method("ciar", tau=math.inf), cloud, device, conditions(1), s,
                                   torch.Generator().manual_seed(4))
    assert never.stats["sent"] == 0 and drafted_u.numel() > 0


def test_calibration_and_budget_controller():
    scores = torch.rand(10000, generator=torch.Generator().manual_seed(0)).numpy()
    tau = calibrate_tau(scores, 0.3)
    assert abs((scores >= tau).mean() - 0.3) < 0.01
    assert calibrate_tau(scores, 1.0) == -math.inf and calibrate_tau(scores, 0.0) == math.inf
    with pytest.raises(ValueError):
        calibrate_tau(scores, 1.5)
    c = BudgetController(tau=0.5, target_rate=0.3)
    assert c.update(sent=8, positions=10) > 0.5  # too many sent: raise tau
    c2 = BudgetController(tau=0.5, target_rate=0.3)
    assert c2.update(sent=0, positions=10) < 0.5


def test_budget_controller_holds_the_cloud_calls_with_the_prefix_counted():
    """Drive the controller with streams of U-like scores, as the loop does: a kept draft covers one position, a
    sent one that the cloud keeps two (the draft and the cloud's next token). Over a 1024-token image (LlamaGen at
    512 px) the image's cloud calls, the prefix's 61 forwards included, land on the target; a controller that does
    not take the prefix off the budget overshoots by about its share (measured: mean 0.337)."""
    T, m, target = 1024, 61, 0.3
    calls = []
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        scores = torch.exp(-10 * torch.rand(T, generator=g))  # spread over decades, as U is
        accepted = (torch.rand(T, generator=g) < 0.3).tolist()
        for start in (0.5, 0.7, 0.9):  # tau at these quantiles sends 50%, 30%, 10% of the drafts
            c = BudgetController(tau=float(scores.quantile(start)), target_rate=target)
            c.reserve(m, T)
            assert c.allowance == pytest.approx((target * T - m) / (T - m))
            t, sent = m, 0
            for score, kept in zip(scores.tolist(), accepted):
                if t >= T:
                    break
                send = score >= c.tau
                sent += send
                c.update(sent, t + 1 - m)
                t += 2 if send and kept else 1
            calls.append((m + sent) / T)
    assert abs(sum(calls) / len(calls) - target) < 0.015 and max(abs(x - target) for x in calls) < 0.035, calls
    over = BudgetController(tau=0.5, target_rate=0.05)
    over.reserve(20, 256)  # the prefix alone spends the budget: send nothing more
    assert over.allowance == 0.0 and over.update(sent=1, positions=1) > 0.5
    with pytest.raises(ValueError, match="prefix"):
        over.reserve(256, 256)
    with pytest.raises(ValueError, match="target_rate"):
        BudgetController(tau=0.5, target_rate=1.5)


def test_a_cap_keeps_tau_fixed_until_the_image_has_spent_it():
    """capped(): an image under the cap sends exactly what tau fixed sends (tau never moves); an image over it sends
    what tau fixed sends up to the wall, then nothing. The target controller, by contrast, lowers tau on the easy
    image to spend the share."""
    g = torch.Generator().manual_seed(0)
    T, cap = 256, 0.2
    easy = (torch.rand(T, generator=g) * 0.5).tolist()  # few scores above tau = 0.45
    hard = (0.3 + 0.7 * torch.rand(T, generator=g)).tolist()  # most above it
    tau0 = 0.45

    def run(scores, controller):
        controller.reserve(0, T)
        sent, taus = [], []
        for t, score in enumerate(scores):
            sent.append(score >= controller.tau)
            taus.append(controller.update(sum(sent), t + 1))
        return sent, taus

    fixed_easy = [s >= tau0 for s in easy]
    capped_easy, taus = run(easy, BudgetController.capped(tau0, cap))
    assert capped_easy == fixed_easy and sum(fixed_easy) < cap * T - 1 and set(taus) == {tau0}
    held_easy, held_taus = run(easy, BudgetController(tau0, cap))
    assert min(held_taus) < tau0 and sum(held_easy) > sum(capped_easy)  # the target controller spends the share
    capped_hard, taus = run(hard, BudgetController.capped(tau0, cap))
    wall = math.floor(cap * T) - 1  # the prefill is a cloud forward too
    first = taus.index(math.inf)
    assert sum(s >= tau0 for s in hard) > wall and sum(capped_hard) == wall
    assert capped_hard[:first + 1] == [s >= tau0 for s in hard[:first + 1]] and not any(capped_hard[first + 1:])


def test_a_cap_is_hard_no_image_spends_past_it():
    """capped(): however many drafts score above tau, the image's cloud forwards (prefill, prefix, verifications)
    stop at floor(cap * T); a cap the prefix alone spends sends nothing. The target controller has no such wall."""
    T, m, cap = 256, 15, 0.2
    for controller, wall in ((BudgetController.capped(0.5, cap), True), (BudgetController(0.5, cap), False)):
        controller.reserve(m, T)
        sent = 0
        for t in range(T - m):
            sent += 1.0 >= controller.tau  # every draft scores 1.0: all would go up
            controller.update(sent, t + 1)
        forwards = 1 + m + sent
        assert (forwards == math.floor(cap * T)) if wall else (forwards > cap * T)
    starved = BudgetController.capped(0.5, 0.05)
    starved.reserve(m, T)  # 12 forwards allowed, 16 already spent on the prefill and the prefix
    assert starved.tau == math.inf and starved.limit == 0 and starved.update(0, 1) == math.inf


@pytest.mark.parametrize("name", ["ciar", "ciar-inflight"])
def test_a_capped_image_in_the_loop_never_makes_more_cloud_forwards_than_its_cap(name):
    """Inside the loop (waiting, and drafting ahead with two verifications in flight, where verdicts void drafts
    and rewind tau), a cap under what tau = 0 would send holds every image at or under floor(cap * T) forwards."""
    cloud, device = tiny(block=64)
    s, cond = SamplingConfig(cfg_scale=2.0), conditions(2)
    T, cap = cloud.config.block_size, 0.25
    for b in range(2):
        free = collaborative_generate(get_method(name, tau=0.0), cloud, device, cond[b:b + 1], s,
                                      torch.Generator().manual_seed(b))
        res = collaborative_generate(get_method(name, tau=0.0), cloud, device, cond[b:b + 1], s,
                                     torch.Generator().manual_seed(b), budget=BudgetController.capped(0.0, cap))
        assert free.stats["cloud_forwards"] > cap * T  # tau = 0 sends every draft: the cap binds
        assert res.stats["cloud_forwards"] <= math.floor(cap * T)


def test_budget_controller_steers_the_loop_from_a_bad_tau():
    """Inside the loop the controller moves a tau that sends nothing (or everything) towards the target share,
    also while drafts stay on the device (it updates after every draft, not only after a send)."""
    cloud, device = tiny(block=64)
    s, cond = SamplingConfig(cfg_scale=2.0), conditions(1)
    probe = collaborative_generate(get_method("ciar", tau=math.inf), cloud, device, cond, s,
                                   torch.Generator().manual_seed(5))
    u = probe.u[0][~torch.isnan(probe.u[0])]
    shares = {}
    for name, tau in (("high", 1.5 * float(u.max())), ("low", 0.1 * float(u.min()))):
        for controlled in (False, True):
            budget = BudgetController(tau, target_rate=0.3) if controlled else None
            out = collaborative_generate(get_method("ciar", tau=tau), cloud, device, cond, s,
                                         torch.Generator().manual_seed(5), budget=budget)
            shares[name, controlled] = out.stats["sent"] / (out.stats["sent"] + out.stats["local"])
    assert shares["high", False] == 0 < shares["high", True]
    assert shares["low", False] == 1 > shares["low", True]


def test_unknown_method_and_missing_neighbours():
    with pytest.raises(KeyError, match="ciar"):
        get_method("nope")
    cloud, device = tiny()
    with pytest.raises(ValueError, match="neighbours"):
        collaborative_generate(METHODS["lantern"], cloud, device, conditions(1), SamplingConfig(),
                               torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="codebook"):
        collaborative_generate(METHODS["latent"], cloud, device, conditions(1), SamplingConfig(),
                               torch.Generator().manual_seed(0))


def test_the_latent_gate_sends_the_drafts_whose_distribution_spreads_in_latent_space():
    """The latent score the loop records at every draft is the latent spread of the device's processed
    distribution there (teacher-forced on the final tokens), and the drafts sent are those scoring >= tau; without
    a codebook the score is not recorded and other methods run as before."""
    from ciar.models.sampling import latent_spread
    cloud, device = tiny()
    s, cond, P, book = SamplingConfig(cfg_scale=2.0), conditions(1), device.config.cls_token_num, codebook(48)
    device_only = collaborative_generate(get_method("device"), cloud, device, cond, s,
                                         torch.Generator().manual_seed(2), codebook=book)
    tokens = device_only.tokens
    with torch.no_grad():
        logits = device(cond=device.cfg_condition(cond), tokens=tokens[:, :-1].repeat(2, 1)).logits[:, P - 1:]
    torch.testing.assert_close(device_only.scores["latent"], latent_spread(model_probs(logits, s), book),
                               rtol=1e-4, atol=1e-5)
    spread = device_only.scores["latent"][0]
    tau = float(spread.median())
    gated = collaborative_generate(get_method("latent", tau=tau), cloud, device, cond, s,
                                   torch.Generator().manual_seed(2), codebook=book)
    drafted = ~torch.isnan(gated.scores["latent"][0])
    assert bool((gated.scores["latent"][0][gated.sent[0]] >= tau).all()) and gated.stats["sent"] > 0
    assert bool((gated.scores["latent"][0][drafted & ~gated.sent[0]] < tau).all())
    plain = collaborative_generate(get_method("device"), cloud, device, cond, s, torch.Generator().manual_seed(2))
    assert torch.equal(plain.tokens, tokens) and bool(plain.scores["latent"].isnan().all())


def test_link_charges_exactly_what_the_protocol_encodes():
    import numpy as np

    from ciar.cloud_bridge import protocol as p
    from ciar.engine import link

    rng = np.random.default_rng(0)
    for n, k, s, F in [(0, 1, 1, 0), (5, 1, 40, 267), (0, 4, 1024, 267), (300, 1, 3, 11)]:
        qs = []
        for j in range(k):
            ids = np.sort(rng.choice(1024, size=s, replace=False)).astype(np.uint16)
            probs = np.full(s, 1.0 / s)
            qs.append(p.SparseQ(ids, probs))
        drafts = np.array([q.ids[0] for q in qs], np.uint16)
        feats = rng.normal(size=(n + k, F)).astype(np.float16) if F else None
        msg = p.Verify(session=1, seq=1, start=0, tokens=rng.integers(0, 1024, n).astype(np.uint16), drafts=drafts,
                       q=tuple(qs), features=feats)
        frame = len(msg.encode())
        assert link.verify_request_bytes(n, k, s, F) == frame + link.ws_frame_bytes(frame, client=True)
    verdict = len(p.Verdict(session=1, seq=1, n_accepted=1, next_token=5).encode())
    assert link.verdict_bytes() == verdict + link.ws_frame_bytes(verdict, client=False)
    opened = len(p.Opened(session=1, tokens=np.arange(15, dtype=np.uint16)).encode())
    assert link.tokens_bytes(15) == opened + link.ws_frame_bytes(opened, client=False)
    caption = "a large red circle at the top left, on a white background"
    op = len(p.Open(caption=caption, seed=1, num_tokens=256, prefix_tokens=15, cfg_scale=3.0, temperature=1.0,
                    top_k=0, top_p=1.0, use_interval_features=True).encode())
    assert link.open_bytes(len(caption.encode())) == op + link.ws_frame_bytes(op, client=True)


def test_timeline_prices_overlap_on_any_link():
    from ciar.engine.timeline import Request, Timeline

    lan, g4 = LINKS["lan"], LINKS["4g"]
    tl = Timeline()
    first = tl.send(Request(cloud_s=0.004, up_bytes=1000, down_bytes=100))
    tl.add_device(0.003)  # the device drafts while the request is out
    tl.wait(first)
    second = tl.send(Request(cloud_s=0.004, up_bytes=1000, down_bytes=100))
    tl.wait(second)  # waits straight away: no overlap
    tl.add_device(0.002)
    for link in (lan, g4):
        reply = link.request_s(1000, 100) + 0.004
        assert tl.seconds(link) == pytest.approx(max(0.003, reply) + reply + 0.002)
    assert tl.device_seconds == pytest.approx(0.005)
    busy = Timeline()
    r = busy.send(Request(0.001, 10, 10))
    busy.add_device(1.0)  # longer than the reply: the device never waits
    busy.wait(r)
    assert busy.seconds(g4) == pytest.approx(1.0)
    queued = Timeline()  # two requests in flight: the cloud serves them in order
    a, b = queued.send(Request(0.030, 0, 0)), queued.send(Request(0.030, 0, 0))
    queued.wait(a)
    queued.wait(b)
    assert queued.seconds(g4) == pytest.approx(g4.rtt_s + 0.060)


def test_the_cloud_answers_a_stale_request_without_touching_its_state():
    cloud, _ = tiny()
    from ciar.engine.verifier import CloudVerifier

    s, g = SamplingConfig(cfg_scale=2.0), torch.Generator().manual_seed(0)
    v = CloudVerifier(cloud, s)
    v.start(conditions(1), 16, 0)
    v.prefix(2, g)
    q = torch.full((1, 1, 48), 1 / 48)
    assert v.verify(3, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), q, g) is None
    n, nxt = v.verify(2, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), q, g)
    at, forwards = v.n_ingested, v.forwards
    wrong = (nxt + 1) % 48  # a request whose first token is not the one the cloud chose at `at`
    assert v.verify(at, wrong[:, None], torch.zeros(1, 1, dtype=torch.long), q, g) is None
    assert v.verify(at, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), q, g) is None
    assert (v.n_ingested, v.forwards) == (at, forwards)
    assert v.verify(at, nxt[:, None], torch.zeros(1, 1, dtype=torch.long), q, g) is not None


def _tau_sending(cloud, device, cond, s, share: float) -> float:
    """A tau that sends about `share` of the device's drafts (calibrated on one gate-free run)."""
    probe = collaborative_generate(get_method("ciar", tau=math.inf), cloud, device, cond, s,
                                   torch.Generator().manual_seed(3))
    u = probe.u[~torch.isnan(probe.u)]
    return float(torch.quantile(u, 1.0 - share))


@pytest.mark.parametrize("extend", [False, True])
def test_an_uncertain_run_goes_up_as_one_chain(extend):
    """ciar-chain: a chain is the run of uncertain drafts from the one that triggered it, ended by the first
    confident draft (or the most drafts, or the image's end); a fixed chain always has `chain` drafts."""
    import dataclasses

    from ciar.engine.policy import speculative_sampling

    cloud, device = tiny(vocab=16, block=64)
    s, cond = SamplingConfig(cfg_scale=2.0, temperature=1.0), conditions(1)
    method = dataclasses.replace(get_method("ciar-chain", tau=_tau_sending(cloud, device, cond, s, 0.4)),
                                 chain_extend=extend)
    chains: list[int] = []

    def recording(p, q, drafts, generator):
        chains.append(drafts.shape[1])
        return speculative_sampling(p, q, drafts, generator)

    out = collaborative_generate(method, cloud, device, cond, s, torch.Generator().manual_seed(4), policy=recording)
    ends = [k for k in chains if k < 4]
    assert out.stats["cloud_forwards"] == 1 + int(0.06 * 64) + len(chains)
    if not extend:
        assert len(ends) <= 1  # only a chain cut by the image's end is shorter
        assert int(out.sent.sum()) == len(chains)  # the map marks the draft that triggered each chain
        return
    assert 1 not in chains[:-1] and len(set(chains)) > 1  # the length follows the run: 2..4 (1 only at the end)
    # the uncertain drafts that extended a chain are on the map too (a rejected draft's position may be drafted
    # again later, so positions can repeat across chains)
    n_sent = int(out.sent.sum())
    assert len(chains) < n_sent <= sum(chains)
    assert out.stats["tokens_per_cloud_forward"] > 1


@pytest.mark.parametrize("in_flight", [1, 4])
@pytest.mark.parametrize("chain", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_drafting_past_a_verification_changes_time_not_tokens(chain, batch, in_flight):
    """Greedy: drafting on while verifications are in flight (keeping what agrees with each verdict, rewinding
    otherwise) gives exactly the tokens of waiting for every verdict; the test sees both kinds of outcome."""
    import dataclasses

    cloud, _ = tiny(vocab=16, block=64)
    device = build_device_model(cloud.config, cloud=cloud).eval()  # the cloud's first layer: they often agree
    phi = IntervalProjection(PhiConfig(device.config.dim, 11, cloud.config.dim))
    s, cond = SamplingConfig(cfg_scale=2.0, temperature=0.0), conditions(batch)
    waiting = dataclasses.replace(get_method("ciar", tau=_tau_sending(cloud, device, cond, s, 0.3)), chain=chain)
    ahead = dataclasses.replace(waiting, lookahead=8, max_in_flight=in_flight)
    # with the budget controller too: a rewind gives tau back its value at the position rewound to
    a, b = (collaborative_generate(m, cloud, device, cond, s, torch.Generator().manual_seed(3), phi=phi,
                                   budget=BudgetController(m.tau, 0.3)) for m in (waiting, ahead))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.sent, b.sent) and torch.equal(a.source, b.source)
    torch.testing.assert_close(a.u, b.u, equal_nan=True, rtol=1e-4, atol=0)  # the same drafts on record
    assert a.stats["voided"] == a.stats["kept_ahead"] == 0
    assert b.stats["voided"] > 0 and b.stats["rewinds"] > 0  # verdicts that threw drafts away ...
    if batch == 1:
        assert b.stats["kept_ahead"] > 0  # ... and verdicts that kept them (here 3 rows never all agree)
    if batch == 3 and in_flight > 1:
        assert b.stats["stale_requests"] > 0  # ... and requests built on drafts that a verdict then voided
    if in_flight == 1:
        assert b.stats["stale_requests"] == 0
    # the same verifications; sending while others are in flight adds only requests the cloud found stale
    assert b.stats["cloud_forwards"] == a.stats["cloud_forwards"]
    assert b.stats["requests"] - b.stats["stale_requests"] == a.stats["requests"]
    assert a.stats["stale_requests"] == 0
    for r in (a, b):
        st = r.stats
        assert st["seconds"] == pytest.approx(r.timeline.seconds(LINKS["lan"]))
        assert st["seconds"] <= st["device_seconds"] + st["cloud_seconds"] + st["link_seconds"] + 1e-9
    assert a.stats["seconds"] >= a.stats["cloud_seconds"] + a.stats["link_seconds"]  # waiting: nothing hides them


def test_the_device_feeds_its_sent_draft_while_the_cloud_verifies():
    """Waiting for a verdict, the device has already written its sent draft into its cache (a device event between
    each send and its wait: on its own clock, overlapping the cloud's), so after every verdict it feeds one token,
    the verdict's: a bonus after a kept draft, or a correction written over a rejected one."""
    from ciar.engine.loop import CLOUD, VERIFIED
    from ciar.engine.proposer import DeviceProposer

    fed: list[tuple[int, int]] = []

    class Recording(DeviceProposer):
        def ingest(self, tokens, at):
            fed.append((at, tokens.shape[1]))
            super().ingest(tokens, at)

    cloud, device = tiny(vocab=16, block=64)
    s, cond = SamplingConfig(cfg_scale=2.0, temperature=1.0), conditions(1)
    method = get_method("ciar", tau=_tau_sending(cloud, device, cond, s, 0.4))
    out = collaborative_generate(method, cloud, device, cond, s, torch.Generator().manual_seed(4),
                                 proposer=Recording(device, s))
    m = int(method.prefix_fraction * 64)
    sent = out.sent[0]
    assert (out.source[0][sent] == VERIFIED).any() and (out.source[0][sent] == CLOUD).any()  # kept and rejected
    assert fed[0] == (0, m) and all(n == 1 for _, n in fed[1:])
    assert all(b[0] in (a[0], a[0] + 1) for a, b in zip(fed[1:], fed[2:]))  # on, or over a rejected draft
    events = out.timeline.events
    sends = [i for i, (kind, _) in enumerate(events) if kind == "send"][1:]  # [0] opens the session
    assert len(sends) == out.stats["requests"] - 1 > 0
    assert all(events[i + 1][0] == "device" and events[i + 2] == ("wait", events[i][1]) for i in sends)


def test_drafting_ahead_never_makes_the_image_depend_on_the_link():
    cloud, device = tiny(block=64)
    s, cond = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=20), conditions(1)
    method = get_method("ciar-inflight", tau=_tau_sending(cloud, device, cond, s, 0.3))
    runs = {name: collaborative_generate(method, cloud, device, cond, s, torch.Generator().manual_seed(8),
                                         link=LINKS[name]) for name in ("lan", "4g")}
    assert torch.equal(runs["lan"].tokens, runs["4g"].tokens)
    assert runs["4g"].stats["seconds"] > runs["lan"].stats["seconds"]


def _two_sample_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two count vectors are implausible as draws from one distribution (two-sample chi-square, about
    4.5 sigma; cells with fewer than 10 counts in all pooled)."""
    keep = (a + b) >= 10
    stat = float((((a[keep] - b[keep]) ** 2) / (a[keep] + b[keep])).sum())
    rest_a, rest_b = float(a[~keep].sum()), float(b[~keep].sum())
    stat += (rest_a - rest_b) ** 2 / max(rest_a + rest_b, 1.0)
    dof = int(keep.sum())
    return stat > dof + 4.5 * math.sqrt(2 * dof)


def _image_counts(method, cloud, device, phi, cond, s, n: int, seed: int) -> torch.Tensor:
    """How often each whole image (V ** T of them) came out of n batch-1 decodes, budget controller on."""
    V, T = cloud.config.vocab_size, cloud.config.block_size
    counts = torch.zeros(V ** T)
    for i in range(n):
        out = collaborative_generate(method, cloud, device, cond, s, torch.Generator().manual_seed(seed + i),
                                     phi=phi, budget=BudgetController(method.tau, 0.4))
        counts[int((out.tokens[0] * V ** torch.arange(T - 1, -1, -1)).sum())] += 1
    return counts


def test_drafting_ahead_samples_what_the_waiting_loop_samples():
    """Sampling, lossy gate, budget and phi on: the images of ciar drafting ahead (rewinds, guesses, stale requests
    all happen) are distributed as those of ciar waiting for every verdict; a different tau is told apart."""
    import dataclasses

    cloud, _ = tiny(vocab=4, block=4, dim=32, layers=2)
    device = build_device_model(cloud.config, cloud=cloud).eval()
    phi = IntervalProjection(PhiConfig(device.config.dim, 11, cloud.config.dim))
    s, cond = SamplingConfig(cfg_scale=2.0, temperature=1.0), conditions(1, seed=3)
    waiting = dataclasses.replace(get_method("ciar", tau=_tau_sending(cloud, device, cond, s, 0.4)),
                                  prefix_fraction=0.0)
    ahead = dataclasses.replace(waiting, lookahead=2, max_in_flight=2)
    n = 2500
    base = _image_counts(waiting, cloud, device, phi, cond, s, n, seed=0)
    assert not _two_sample_differ(base, _image_counts(ahead, cloud, device, phi, cond, s, n, seed=10**6))
    other = dataclasses.replace(waiting, tau=_tau_sending(cloud, device, cond, s, 0.1))
    assert _two_sample_differ(base, _image_counts(other, cloud, device, phi, cond, s, n, seed=2 * 10**6))


def test_the_proposer_gives_the_teacher_forced_u_with_its_own_neighbours():
    """Token by token through its KV cache, the proposer's U equals the U of one teacher-forced pass with the
    sequence's `neighbour_ids` (its neighbour bookkeeping is right, including the rewind-by-overwrite)."""
    from ciar.engine.proposer import DeviceProposer
    from ciar.models import interfuse
    from ciar.models.interval import neighbour_ids
    _, device = tiny(block=16)
    s = SamplingConfig(cfg_scale=2.0, temperature=1.0)
    cond, T, P = conditions(2), 16, device.config.cls_token_num
    tokens = torch.randint(0, 48, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = device.forward_interval(cond=device.cfg_condition(cond), tokens=tokens[:, :-1].repeat(2, 1))
        want = interfuse(*device.processed_box(out.centre[:, P - 1:], out.radius[:, P - 1:],
                                               neighbour_ids(tokens, device.config.grid_size), 2.0, 1.0)).u
    prop = DeviceProposer(device, s)
    prop.start(cond, T)
    gen = torch.Generator().manual_seed(0)
    got = [prop.draft(gen).u]
    prop.ingest(torch.randint(0, 48, (2, 3), generator=gen), 0)  # a wrong branch, rewound below
    for t in range(T - 1):
        prop.ingest(tokens[:, t:t + 1], t)
        got.append(prop.draft(gen).u)
    torch.testing.assert_close(torch.stack(got, 1), want, rtol=1e-5, atol=1e-6)
