"""Linear probe: multinomial logistic regression on frozen image features, in torch.

This is the evaluation of OpenAI's README ("Linear-probe evaluation") and of the CLIP paper,
without scikit-learn: the objective is scikit-learn's ``LogisticRegression(C=C)``, solved with
L-BFGS in float64, and ``C`` is chosen on a validation split as in the paper (appendix A.3).

    train = model.encode_image(train_images)   # or features computed batch by batch
    probe = clip.linear_probe(train, train_labels)
    accuracy = probe.score(model.encode_image(test_images), test_labels)

Objective, for N samples, K classes and features x: the summed cross entropy of
softmax(W x + b) plus ``||W||² / (2 C)``, the bias not penalised. With two classes it is
scikit-learn's binary one, a single weight vector ``w`` (the logit of the second class) with
penalty ``||w||² / (2 C)``, so ``C`` means the same as there for any number of classes.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    import numpy as np

    FeaturesLike = Union[Tensor, np.ndarray[Any, Any]]
    LabelsLike = Union[Sequence[int], Sequence[str], Tensor, np.ndarray[Any, Any]]

__all__ = ["LinearProbe", "linear_probe"]

Label = Union[int, str]

# The CLIP paper's sweep: log10 C from -6 to 6, first every 2 decades, then halving the step
# around the best value until 8 steps per decade.
SWEEP_RANGE = (-6.0, 6.0)
SWEEP_COARSE_STEP = 2.0
SWEEP_FINEST_STEP = 0.125


@dataclass(frozen=True)
class LinearProbe:
    """A fitted linear probe: ``logits = features @ weight.T + bias``.

    Attributes:
        weight: [K, D] float64, one row per class, in the order of ``classes``.
        bias: [K] float64, centred (only differences between classes matter).
        classes: the K distinct training labels, sorted.
        C: the inverse L2 regularisation strength used (given, or chosen by the sweep).
        val_accuracy: validation accuracy of each C the sweep tried, by C in increasing order;
            empty when C was given.
    """

    weight: Tensor
    bias: Tensor
    classes: tuple[Label, ...]
    C: float
    val_accuracy: dict[float, float] = field(default_factory=dict)

    def logits(self, features: FeaturesLike) -> Tensor:
        """Class scores [N, K] (float64, on ``weight``'s device) of features [N, D].

        Raises:
            ValueError: features are not [N, D] with this probe's D, or not finite.
        """
        x = _features(features, "features").to(self.weight.device)
        if x.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"features have {x.shape[1]} dimensions but the probe was trained on "
                f"{self.weight.shape[1]}: use features from the same model"
            )
        return x @ self.weight.T + self.bias

    def predict_proba(self, features: FeaturesLike) -> Tensor:
        """Class probabilities [N, K] (float64), columns in the order of ``classes``."""
        return self.logits(features).softmax(dim=1)

    def predict(self, features: FeaturesLike) -> list[Label]:
        """The most probable class label of each of features [N, D]."""
        return [self.classes[i] for i in self.logits(features).argmax(dim=1).tolist()]

    def score(self, features: FeaturesLike, labels: LabelsLike) -> float:
        """Accuracy (a fraction in [0, 1]) on ``features`` [N, D] with true ``labels`` [N].

        Raises:
            ValueError: lengths differ, or a label is not one of ``classes`` (a test class the
                probe never saw would otherwise count as silently wrong).
        """
        truth = _labels(labels, "labels")
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = [label for label in truth if label not in index]
        if unknown:
            raise ValueError(
                f"label {unknown[0]!r} is not one of the probe's {len(self.classes)} classes "
                f"(e.g. {list(self.classes[:3])}): train on every class you test on"
            )
        pred = self.logits(features).argmax(dim=1).tolist()
        if len(pred) != len(truth):
            raise ValueError(f"{len(pred)} feature rows but {len(truth)} labels")
        return sum(p == index[t] for p, t in zip(pred, truth)) / len(truth)


def linear_probe(
    train_features: FeaturesLike,
    train_labels: LabelsLike,
    *,
    C: Optional[float] = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> LinearProbe:
    """Fit a logistic-regression probe on frozen features, as scikit-learn's
    ``LogisticRegression(C=C, max_iter=max_iter)`` would.

    With ``C=None``, ``C`` is swept as in the CLIP paper: ``val_fraction`` of each class is held
    out (shuffled with ``seed``), C = 10^-6, 10^-4 ... 10^6 are fitted on the rest and scored on
    it, then the step around the best is halved until 1/8 decade (at most 15 fits). The best is the
    highest validation accuracy (ties: the lower validation cross entropy, then the smaller C).
    The probe is then refitted on all the training data with it.

    Computation is in float64 on the features' device (numpy features: the CPU), with
    ``torch.optim.LBFGS`` (strong Wolfe line search) from zero weights (each C of the sweep
    from the solution of its nearest fitted C): the same inputs give the same probe.

    Args:
        train_features: [N, D] features (torch or numpy; any real dtype), e.g. from
            ``model.encode_image``. Not normalised here; normalise them yourself if you want.
        train_labels: N class labels, all ints or all strings (list, numpy array, tensor).
        C: inverse L2 regularisation strength (> 0), or None to sweep it.
        val_fraction: fraction of each class held out for the sweep, in (0, 1).
        seed: seed of the validation split.
        max_iter: L-BFGS iteration limit of each fit.
        tol: stop when no gradient entry of the mean objective exceeds this.

    Returns:
        The fitted :class:`LinearProbe`.

    Raises:
        ValueError: lengths differ; fewer than 2 classes; features not [N, D] or not finite;
            ``C``, ``val_fraction``, ``max_iter`` or ``tol`` out of range; a class with fewer
            than 2 samples when sweeping (none would be left to validate it).
        TypeError: labels are not all ints or all strings.

    Warns:
        RuntimeWarning: the final fit reached ``max_iter`` before ``tol``.
    """
    x = _features(train_features, "train_features")
    labels = _labels(train_labels, "train_labels")
    if len(labels) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} feature rows but {len(labels)} labels")
    classes = tuple(sorted(set(labels)))  # all int or all str (checked)
    if len(classes) < 2:
        raise ValueError(
            f"a probe needs at least 2 classes, but every label is {classes[0]!r}"
            if classes
            else "no training samples"
        )
    if C is not None:
        _check_C(C)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not (isinstance(tol, numbers.Real) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[label] for label in labels], device=x.device)
    x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # bias as a last feature

    val_accuracy: dict[float, float] = {}
    if C is None:
        train_idx, val_idx = _split(y, len(classes), val_fraction, seed, classes)
        C, val_accuracy = _sweep(
            (x1[train_idx], y[train_idx]), (x1[val_idx], y[val_idx]), len(classes), max_iter, tol
        )
    theta, converged = _fit(x1, y, len(classes), float(C), max_iter, tol)
    if not converged:
        warnings.warn(
            f"the linear probe did not converge in max_iter={max_iter} L-BFGS iterations "
            f"(C={C:g}); raise max_iter, or scale the features",
            RuntimeWarning,
            stacklevel=2,
        )
    weight, bias = _per_class(theta, len(classes))
    return LinearProbe(weight, bias, classes, float(C), val_accuracy)


def _sweep(
    train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], k: int, max_iter: int, tol: float
) -> tuple[float, dict[float, float]]:
    """The best C on the validation split, and the validation accuracy of every C tried."""
    low, high = SWEEP_RANGE
    scores: dict[float, tuple[float, float]] = {}  # log10 C -> (accuracy, -cross entropy)

    solutions: dict[float, Tensor] = {}

    def evaluate(exponent: float) -> None:
        if exponent in scores:
            return
        # warm start from the nearest C already fitted (the regularisation path, as sklearn's
        # LogisticRegressionCV walks it): far fewer iterations at large C
        start = min(solutions, key=lambda e: (abs(e - exponent), e), default=None)
        init = None if start is None else solutions[start]
        theta, _ = _fit(*train, k, 10.0**exponent, max_iter, tol, init)
        solutions[exponent] = theta
        logits = _logits(val[0], theta, k)
        accuracy = (logits.argmax(dim=1) == val[1]).double().mean().item()
        scores[exponent] = (accuracy, -F.cross_entropy(logits, val[1]).item())

    def best() -> float:
        return max(scores, key=lambda e: (*scores[e], -e))

    exponent = low
    while exponent <= high:
        evaluate(exponent)
        exponent += SWEEP_COARSE_STEP
    step = SWEEP_COARSE_STEP
    while step > SWEEP_FINEST_STEP:
        step /= 2
        centre = best()
        for exponent in (centre - step, centre + step):
            if low <= exponent <= high:
                evaluate(exponent)
    accuracy = {10.0**e: scores[e][0] for e in sorted(scores)}
    return 10.0 ** best(), accuracy


def _logits(x1: Tensor, theta: Tensor, k: int) -> Tensor:
    logits = x1 @ theta.T
    return F.pad(logits, (1, 0)) if k == 2 else logits  # binary: class 0's logit is 0


def _fit(
    x1: Tensor,
    y: Tensor,
    k: int,
    C: float,
    max_iter: int,
    tol: float,
    init: Optional[Tensor] = None,
) -> tuple[Tensor, bool]:
    """Minimise mean cross entropy + ||W||²/(2 C N) (sklearn's objective over N) from ``init``
    (zeros by default): the weights [K or 1, D + 1] (bias last), and whether L-BFGS stopped
    before ``max_iter``."""
    n = x1.shape[0]
    shape = (1 if k == 2 else k, x1.shape[1])
    theta = (x1.new_zeros(shape) if init is None else init.clone()).requires_grad_(True)
    penalty = 1.0 / (2.0 * C * n)
    optimizer = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=tol * tol,  # a stall in float64 only: the gradient decides
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(_logits(x1, theta, k), y) + penalty * theta[:, :-1].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    n_iter = int(optimizer.state[theta].get("n_iter", 0))
    return theta.detach(), n_iter < max_iter


def _per_class(theta: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-class weight [K, D] and centred bias [K] from the fitted parameters."""
    if k == 2:  # softmax of (-z/2, z/2) is sigmoid(z) for the second class
        theta = torch.cat([-theta / 2, theta / 2])
    weight, bias = theta[:, :-1].contiguous(), theta[:, -1]
    return weight, bias - bias.mean()


def _split(
    y: Tensor, k: int, val_fraction: float, seed: int, classes: tuple[Label, ...]
) -> tuple[Tensor, Tensor]:
    """Stratified split: ceil(val_fraction · n_c) of each class to validation, at least one
    sample of each class left to train on."""
    if not (isinstance(val_fraction, numbers.Real) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    counts = torch.bincount(y.cpu(), minlength=k)
    if counts.min() < 2:
        rare = classes[int(counts.argmin())]
        raise ValueError(
            f"class {rare!r} has {int(counts.min())} training sample: sweeping C holds out a "
            "validation split and needs at least 2 samples per class. Pass C= (e.g. C=0.316), "
            "or give more samples"
        )
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in range(k):
        members = (y.cpu() == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(math.ceil(len(members) * val_fraction - 1e-9), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _check_C(C: object) -> None:
    if isinstance(C, bool) or not isinstance(C, numbers.Real) or not 0 < float(C) < math.inf:
        raise ValueError(
            f"C (the inverse regularisation strength) must be a positive number, got {C!r}; "
            "pass C=None to sweep it"
        )


def _features(features: object, name: str) -> Tensor:
    """Features as a finite float64 [N, D] tensor."""
    x = torch.as_tensor(features)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be real numbers, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D] (one row per sample), got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise ValueError(
            f"{name} row {row} is not finite (NaN or inf) ({int((~finite).sum())} such rows); "
            "check the model's dtype and the inputs that produced them"
        )
    return x


def _labels(labels: object, name: str) -> list[Label]:
    """Labels as a list of Python ints, or of strings."""
    if isinstance(labels, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of labels, got a single {type(labels).__name__}"
        )
    tolist = getattr(labels, "tolist", None)
    items = tolist() if callable(tolist) else list(labels)  # type: ignore[call-overload]
    if not isinstance(items, list):
        raise TypeError(f"{name} must be a sequence of labels, got a scalar {items!r}")
    out: list[Label] = []
    for item in items:
        if hasattr(item, "item") and not isinstance(item, (str, list)):
            item = item.item()  # numpy / torch scalars in a list
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(
                f"{name} must be class ids (ints) or names (strings), got {type(item).__name__} "
                f"{item!r}"
                + (" (one-hot rows? pass argmax indices)" if isinstance(item, list) else "")
            )
        out.append(item)
    if len({type(label) for label in out}) > 1:
        raise TypeError(f"{name} mix ints and strings; use one kind for every label")
    return out
