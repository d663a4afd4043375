"""elbo_loglik against the exact ELBO, enumerated over every mask pattern."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_causal_lm
from model import ELBO_METHODS, DiscreteDiffusionModel, elbo_draws, elbo_loglik


def dlm(arch="llama", seed=0, shift=True):
    return DiscreteDiffusionModel(tiny_causal_lm(arch, seed=seed), mask_token_id=3, shift=shift).eval()


def pattern_logp(m, x, att, S):
    """sum over i in S of log p(x_i | x with S masked), by a plain forward and shifting by hand."""
    xt = x.clone()
    xt[0, S] = m.mask_token_id
    with torch.no_grad():
        logits = m(xt, att).double()
    logp = F.log_softmax(logits, -1)[0]
    return sum(float(logp[i - 1 if m.shift else i, x[0, i]]) for i in S)


def exact_elbo(m, x, targets, att=None):
    """Every non-empty pattern S of the n targets, weighted 1 / (|S| C(n, |S|))."""
    n = len(targets)
    return sum(pattern_logp(m, x, att, list(S)) / (k * math.comb(n, k))
               for k in range(1, n + 1) for S in itertools.combinations(targets, k))


def exact_deterministic(m, x, targets, mc_num):
    """The expectation of the fixed-level estimator: levels j / mc_num, Bernoulli masks, weight 1 / t."""
    n, total = len(targets), 0.0
    pats = [(list(S), pattern_logp(m, x, None, list(S))) for k in range(1, n + 1)
            for S in itertools.combinations(targets, k)]
    for j in range(1, mc_num + 1):
        t = j / mc_num
        total += sum(t ** len(S) * (1 - t) ** (n - len(S)) * v for S, v in pats) / t
    return total / mc_num


def estimates(m, x, tm, method, mc_num, reps, seed=0):
    """`reps` independent estimates in one call: the row repeated, one generator per copy."""
    g = [torch.Generator().manual_seed(seed * 100003 + r) for r in range(reps)]
    return elbo_loglik(m, x.repeat(reps, 1), tm.repeat(reps, 1), mc_num=mc_num, generator=g, method=method,
                       batch_size=512)


@pytest.mark.parametrize("n_targets,shift", [(3, True), (2, False)])
def test_estimators_are_unbiased_and_reduce_variance(n_targets, shift):
    m = dlm(shift=shift)
    x = torch.tensor([[1, 17, 42, 8, 23, 61, 30, 12]])
    targets = [3, 5, 6][:n_targets]
    tm = torch.zeros_like(x, dtype=torch.bool)
    tm[0, targets] = True
    exact = exact_elbo(m, x, targets)
    var = {}
    for method in ("iid", "stratified", "antithetic"):
        est = estimates(m, x, tm, method, mc_num=4, reps=600)
        se = est.std() / math.sqrt(len(est))
        assert abs(est.mean() - exact) < 4 * se + 1e-9, (method, float(est.mean()), exact, float(se))
        var[method] = float(est.var())
    assert var["stratified"] < var["iid"] and var["antithetic"] < var["iid"], var
    est = estimates(m, x, tm, "deterministic", mc_num=4, reps=600)
    quad = exact_deterministic(m, x, targets, 4)
    assert abs(est.mean() - quad) < 4 * est.std() / math.sqrt(len(est)) + 1e-9
    # the quadrature converges to the ELBO as the number of levels grows
    assert abs(exact_deterministic(m, x, targets, 2000) - exact) < 0.01 * abs(exact)


def test_one_target_is_exact_for_every_method():
    m = dlm()
    x = torch.tensor([[1, 17, 42, 8, 23]])
    tm = torch.zeros_like(x, dtype=torch.bool)
    tm[0, 4] = True
    exact = pattern_logp(m, x, None, [4])
    for method in ("iid", "stratified", "antithetic"):
        assert abs(float(elbo_loglik(m, x, tm, mc_num=3, method=method)[0]) - exact) < 1e-5


def test_draws_stratified_and_antithetic_shapes():
    g = torch.Generator().manual_seed(0)
    masked, w = elbo_draws(5, 10, "stratified", g)
    assert sorted(masked.sum(1).tolist()) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert torch.allclose(w, 5 / masked.sum(1).double())
    masked, w = elbo_draws(5, 6, "antithetic", g)
    k = masked.sum(1)
    assert torch.equal(k[:3] + k[3:], torch.full((3,), 6))
    assert ((masked[:3] & masked[3:]).sum(1) == 1).all() and (masked[:3] | masked[3:]).all()
    with pytest.raises(ValueError, match="method"):
        elbo_draws(3, 4, "nope")


@pytest.mark.parametrize("method", ELBO_METHODS)
def test_padded_batch_equals_one_row_at_a_time(method):
    m = dlm("qwen2")
    rows = [[1, 5, 6, 7, 8, 9, 10], [1, 20, 21], [1, 30, 31, 32, 33]]
    n_tg = [3, 1, 2]
    L = max(map(len, rows))
    x = torch.zeros(3, L, dtype=torch.long)
    att = torch.zeros_like(x)
    tm = torch.zeros_like(x, dtype=torch.bool)
    for b, r in enumerate(rows):
        x[b, L - len(r):] = torch.tensor(r)
        att[b, L - len(r):] = 1
        tm[b, L - n_tg[b]:] = True
    gens = lambda: [torch.Generator().manual_seed(7 + b) for b in range(3)]
    together = elbo_loglik(m, x, tm, att, mc_num=8, generator=gens(), method=method, batch_size=5)
    for b, r in enumerate(rows):
        one = torch.tensor([r])
        t1 = torch.zeros_like(one, dtype=torch.bool)
        t1[0, len(r) - n_tg[b]:] = True
        alone = elbo_loglik(m, one, t1, mc_num=8, generator=[gens()[b]], method=method)
        assert abs(float(together[b]) - float(alone[0])) < 1e-4


def test_bad_target_masks():
    m = dlm()
    x = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="first position"):
        elbo_loglik(m, x, torch.tensor([[True, False, False]]))
    with pytest.raises(ValueError, match="padding"):
        elbo_loglik(m, x, torch.tensor([[False, True, True]]), torch.tensor([[1, 1, 0]]))
    assert float(elbo_loglik(m, x, torch.zeros_like(x, dtype=torch.bool))[0]) == 0.0
