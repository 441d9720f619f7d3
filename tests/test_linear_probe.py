"""clip.linear_probe: scikit-learn's logistic regression on frozen features, in torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import clip


def blobs(n: int = 90, d: int = 5, k: int = 3, seed: int = 0, spread: float = 1.5):
    """Overlapping Gaussian clusters: not separable, so every C has a finite optimum."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 2
    y = torch.arange(n) % k
    x = centres[y] + spread * torch.randn(n, d, generator=g)
    return x, y


# ---- independent oracles of scikit-learn's objective --------------------------------------


def sklearn_objective(x: np.ndarray, y: np.ndarray, k: int, C: float):
    """scikit-learn's LogisticRegression objective and gradient over flat parameters, in numpy.

    Binary (k=2): one vector w and bias b, loss sum log(1 + exp(-s·(w·x + b))) with s = ±1.
    Multinomial: W [k, d], b [k], loss sum of cross entropies. Penalty ||w||² / (2C), no bias.
    """
    n, d = x.shape
    x1 = np.hstack([x, np.ones((n, 1))])
    rows = 1 if k == 2 else k

    def f(flat: np.ndarray):
        theta = flat.reshape(rows, d + 1)
        w = theta[:, :d]
        penalty = (w**2).sum() / (2 * C)
        grad_penalty = np.hstack([w / C, np.zeros((rows, 1))])
        if k == 2:
            s = np.where(y == 1, 1.0, -1.0)
            z = x1 @ theta[0]
            loss = np.logaddexp(0, -s * z).sum()
            dz = -s / (1 + np.exp(s * z))
            grad = (dz @ x1)[None]
        else:
            z = x1 @ theta.T
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            loss = -np.log(p[np.arange(n), y]).sum()
            p[np.arange(n), y] -= 1
            grad = p.T @ x1
        return loss + penalty, (grad + grad_penalty).ravel()

    return f, rows * (d + 1)


def probe_probabilities_from(theta: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    z = np.hstack([x, np.ones((len(x), 1))]) @ theta.reshape(1 if k == 2 else k, -1).T
    if k == 2:
        z = np.hstack([np.zeros_like(z), z])
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def newton(x: np.ndarray, y: np.ndarray, k: int, C: float, steps: int = 50) -> np.ndarray:
    """Full-batch Newton with a numerically differentiated Hessian and backtracking (pinv:
    the multinomial bias is unpenalised, so its all-ones direction is flat)."""
    f, size = sklearn_objective(x, y, k, C)
    theta = np.zeros(size)
    for _ in range(steps):
        value, grad = f(theta)
        h = 1e-5
        hessian = np.stack(
            [(f(theta + h * e)[1] - f(theta - h * e)[1]) / (2 * h) for e in np.eye(size)]
        )
        step = np.linalg.pinv((hessian + hessian.T) / 2) @ grad
        t = 1.0
        while f(theta - t * step)[0] > value and t > 1e-8:
            t /= 2
        theta = theta - t * step
    return theta


@pytest.mark.parametrize("k", [2, 3])
def test_matches_a_newton_solve_of_sklearns_objective(k: int) -> None:
    x, y = blobs(k=k)
    probe = clip.linear_probe(x, y, C=0.5, tol=1e-10)
    theta = newton(x.double().numpy(), y.numpy(), k, 0.5)
    expected = probe_probabilities_from(theta, x.double().numpy(), k)
    np.testing.assert_allclose(probe.predict_proba(x).numpy(), expected, atol=1e-7)


@pytest.mark.parametrize("k", [2, 4])
def test_matches_scipy_lbfgs_as_sklearn_runs_it(k: int) -> None:
    optimize = pytest.importorskip("scipy.optimize")
    x, y = blobs(n=120, d=6, k=k, seed=3)
    f, size = sklearn_objective(x.double().numpy(), y.numpy(), k, 2.0)
    result = optimize.minimize(
        f, np.zeros(size), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 0}
    )
    expected = probe_probabilities_from(result.x, x.double().numpy(), k)
    probe = clip.linear_probe(x, y, C=2.0, tol=1e-10)
    np.testing.assert_allclose(probe.predict_proba(x).numpy(), expected, atol=1e-6)


def test_gradient_of_sklearns_objective_vanishes_at_the_solution() -> None:
    x, y = blobs(k=3)
    probe = clip.linear_probe(x, y, C=1.0, tol=1e-10)
    theta = torch.cat([probe.weight, probe.bias[:, None]], dim=1).numpy().ravel()
    _, grad = sklearn_objective(x.double().numpy(), y.numpy(), 3, 1.0)[0](theta)
    assert np.abs(grad).max() < 1e-6 * len(x)
    assert abs(float(probe.bias.sum())) < 1e-12  # centred


def test_two_class_C_is_sklearns_binary_C_not_the_multinomial_one() -> None:
    x, y = blobs(k=2)
    probe = clip.linear_probe(x, y, C=0.1, tol=1e-10)
    w = (probe.weight[1] - probe.weight[0]).numpy()
    b = float(probe.bias[1] - probe.bias[0])
    _, grad = sklearn_objective(x.double().numpy(), y.numpy(), 2, 0.1)[0](np.append(w, b))
    assert np.abs(grad).max() < 1e-6 * len(x)
    torch.testing.assert_close(probe.weight[0], -probe.weight[1])


def test_string_labels_become_sorted_classes_and_predictions() -> None:
    x, y = blobs(k=3)
    names = ["zebra", "ant", "moth"]
    labels = [names[i] for i in y.tolist()]
    probe = clip.linear_probe(x, labels, C=1.0)
    assert probe.classes == ("ant", "moth", "zebra")
    predicted = probe.predict(x)
    assert set(predicted) <= set(names)
    accuracy = sum(p == t for p, t in zip(predicted, labels)) / len(labels)
    assert probe.score(x, labels) == accuracy > 0.8
    by_int = clip.linear_probe(x, y, C=1.0)
    # same problem, classes permuted: probability columns follow `classes`
    order = [names.index(c) for c in probe.classes]
    torch.testing.assert_close(probe.predict_proba(x), by_int.predict_proba(x)[:, order])


def test_numpy_float32_features_and_labels_give_the_torch_result() -> None:
    x, y = blobs()
    from_torch = clip.linear_probe(x, y.tolist(), C=1.0)
    from_numpy = clip.linear_probe(x.numpy(), y.numpy().astype(np.int32), C=1.0)
    assert from_numpy.classes == (0, 1, 2) and all(type(c) is int for c in from_numpy.classes)
    assert torch.equal(from_numpy.weight, from_torch.weight)
    assert from_numpy.predict(x.numpy()) == from_torch.predict(x)


@pytest.fixture(scope="module")
def swept() -> clip.LinearProbe:
    x, y = blobs(n=120, seed=1, spread=2.5)
    return clip.linear_probe(x, y, seed=5)


def test_sweep_picks_the_c_with_the_best_validation_accuracy(swept: clip.LinearProbe) -> None:
    coarse = [10.0**e for e in range(-6, 7, 2)]
    assert set(coarse) <= set(swept.val_accuracy)
    assert list(swept.val_accuracy) == sorted(swept.val_accuracy)
    assert swept.val_accuracy[swept.C] == max(swept.val_accuracy.values())
    assert swept.val_accuracy[1e-6] < swept.val_accuracy[swept.C]  # weights ~0: one class


def test_sweep_refines_to_an_eighth_of_a_decade_around_the_chosen_c(
    swept: clip.LinearProbe,
) -> None:
    exponents = sorted(round(math.log10(c) * 8) for c in swept.val_accuracy)
    chosen = round(math.log10(swept.C) * 8)
    assert len(swept.val_accuracy) <= 15
    for neighbour in (chosen - 1, chosen + 1):
        assert neighbour in exponents or abs(neighbour) > 48


def test_same_seed_gives_the_same_probe_bit_for_bit(swept: clip.LinearProbe) -> None:
    again = clip.linear_probe(*blobs(n=120, seed=1, spread=2.5), seed=5)
    assert again.C == swept.C and again.val_accuracy == swept.val_accuracy
    assert torch.equal(again.weight, swept.weight) and torch.equal(again.bias, swept.bias)


def test_given_c_skips_the_sweep_and_allows_a_class_with_one_sample() -> None:
    x, y = blobs(n=7, k=3)  # class 0 has 3 samples, classes 1 and 2 have 2
    y[0] = 2
    y[3] = 1
    y[6] = 0  # class 0 now has one sample
    probe = clip.linear_probe(x, y, C=1.0)
    assert probe.C == 1.0 and probe.val_accuracy == {}
    with pytest.raises(ValueError, match=r"class 0 has 1 training sample.*Pass C="):
        clip.linear_probe(x, y)


def test_unconverged_fit_warns() -> None:
    x, y = blobs()
    with pytest.warns(RuntimeWarning, match="did not converge in max_iter=1"):
        clip.linear_probe(x, y, C=1.0, max_iter=1)


@pytest.mark.parametrize(
    "features, labels, kwargs, error, match",
    [
        (torch.zeros(4, 2), [0, 1, 0], {}, ValueError, "4 feature rows but 3 labels"),
        (torch.zeros(4, 2), [1, 1, 1, 1], {}, ValueError, "at least 2 classes.*every label is 1"),
        (torch.zeros(4), [0, 1, 0, 1], {}, ValueError, r"\[N, D\].*shape \(4,\)"),
        (torch.zeros(4, 2), [0, 1, "a", 1], {}, TypeError, "mix ints and strings"),
        (torch.zeros(4, 2), [0.0, 1.0, 0.0, 1.0], {}, TypeError, "ints.*strings.*float"),
        (torch.zeros(2, 2), [[1, 0], [0, 1]], {}, TypeError, "one-hot"),
        (torch.zeros(4, 2), "0101", {}, TypeError, "single str"),
        (torch.zeros(4, 2), [0, 1, 0, 1], {"C": 0}, ValueError, "C .* positive"),
        (torch.zeros(4, 2), [0, 1, 0, 1], {"C": float("inf")}, ValueError, "C .* positive"),
        (torch.zeros(4, 2), [0, 1, 0, 1], {"val_fraction": 1.0}, ValueError, r"\(0, 1\)"),
        (torch.zeros(4, 2), [0, 1, 0, 1], {"max_iter": 0}, ValueError, "max_iter"),
    ],
)
def test_bad_input_is_refused(features, labels, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        clip.linear_probe(features, labels, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_refused_naming_the_row(bad: float) -> None:
    x, y = blobs()
    x[17, 2] = bad
    with pytest.raises(ValueError, match="train_features row 17 is not finite"):
        clip.linear_probe(x, y, C=1.0)


def test_score_refuses_a_label_the_probe_never_saw() -> None:
    x, y = blobs()
    probe = clip.linear_probe(x, y, C=1.0)
    with pytest.raises(ValueError, match="label 3 is not one of the probe's 3 classes"):
        probe.score(x[:2], [0, 3])
    with pytest.raises(ValueError, match="label '0' is not one"):
        probe.score(x[:2], ["0", "1"])


def test_predict_refuses_features_of_another_width() -> None:
    x, y = blobs(d=5)
    probe = clip.linear_probe(x, y, C=1.0)
    with pytest.raises(
        ValueError, match="features have 4 dimensions but the probe was trained on 5"
    ):
        probe.predict(x[:, :4])
