"""Linear probes: how much of a label each layer's mean-pooled representation makes linearly readable.

    manifest rows -> embed(layers="all", pool="mean") once     -> X (files, layers, dim)
    per layer: StandardScaler -> LogisticRegression (lbfgs, multinomial, L2 with C) -> test accuracy

The scaler and the classifier see the training split only. ``split_rows`` makes the classic
splits: by speaker (test speakers never seen in training: for word/digit recognition) or by
utterance, stratified by label (for speaker identification). ``log_mel`` gives a cheap baseline:
the mean log-mel spectrum of each file. Needs scikit-learn (``pip install 'w2v2[probe]'``).
"""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .embed import Item, embed

SPLITS = ("speaker", "utterance")


@dataclass
class LayerResult:
    layer: int
    accuracy: float  # on the test split
    train_accuracy: float
    C: float  # inverse L2 strength used (chosen by cross-validation when several were given)
    converged: bool

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- features
def pooled_features(model, items: list[Item], *, layers="all", batch_size: int = 8, device=None,
                    progress=None) -> tuple[np.ndarray, list[int], list[int], dict[int, str]]:
    """Mean-pooled features of every layer in one pass: (X (ok files, layers, dim), layer ids,
    indices of the ok items (the rows of X, in ``items`` order), {index of a failed item: error})."""
    feats: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    layer_ids = None
    for e in embed(model, items, layers=layers, pool="mean", batch_size=batch_size, device=device):
        layer_ids = e.layers
        if e.ok:
            feats[e.index] = e.features
        else:
            errors[e.index] = e.error
        if progress is not None:
            progress(e)
    if not feats:
        raise ValueError(f"no usable audio among {len(items)} inputs; first error: {next(iter(errors.values()), '-')}")
    kept = sorted(feats)
    return np.stack([feats[i] for i in kept]), layer_ids, kept, errors


def log_mel(wav: torch.Tensor, sample_rate: int = 16000, n_mels: int = 80, n_fft: int = 512,
            win_length: int = 400, hop_length: int = 160) -> torch.Tensor:
    """(samples,) -> (frames, n_mels) log mel energies: 25 ms Hann windows every 10 ms, HTK mel scale."""
    spec = torch.stft(wav.float(), n_fft, hop_length, win_length, torch.hann_window(win_length),
                      center=True, return_complex=True).abs().pow(2)  # (freqs, frames)
    return (mel_filterbank(n_mels, n_fft, sample_rate) @ spec).clamp(min=1e-10).log().T


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale, 0 Hz to Nyquist."""
    def mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    edges_mel = torch.linspace(0.0, mel(sample_rate / 2), n_mels + 2)
    edges = 700.0 * (10 ** (edges_mel / 2595.0) - 1.0)  # (n_mels + 2,) Hz
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # (freqs,)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lo) / (mid - lo)
    down = (hi - freqs) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def log_mel_features(items: list[Item], n_mels: int = 80) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Baseline: mean log-mel spectrum per file -> (X (ok files, 1, n_mels), ok indices, {failed index: error})."""
    from .audio import AudioError, load_audio

    rows, kept, errors = [], [], {}
    for i, it in enumerate(items):
        try:
            wav = it.source if isinstance(it.source, np.ndarray) else load_audio(it.source)
            rows.append(log_mel(torch.from_numpy(wav), n_mels=n_mels).mean(0).numpy())
            kept.append(i)
        except (AudioError, OSError, RuntimeError) as e:
            errors[i] = f"{it.name}: {e}" if isinstance(e, RuntimeError) else str(e)
    return np.stack(rows)[:, None, :], kept, errors


# --------------------------------------------------------------------------- splits
def split_rows(rows: list[dict], by: str, *, label_column: str, speaker_column: str = "speaker",
               test_fraction: float = 0.25, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train indices, test indices) of ``rows``.

    ``by="speaker"``: round(test_fraction x speakers) speakers (at least one) go to test, all their
    rows with them, so train and test speakers are disjoint. ``by="utterance"``: within each label,
    a ``test_fraction`` of its rows (at least one, when it has two or more) go to test."""
    if by not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {by!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    rng = random.Random(seed)
    column = speaker_column if by == "speaker" else label_column
    _require_column(rows, column)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row[column], []).append(i)
    if by == "speaker":
        speakers = sorted(groups)
        if len(speakers) < 2:
            raise ValueError(f"splitting by speaker needs at least 2 speakers in column {column!r}, "
                             f"found {len(speakers)}")
        rng.shuffle(speakers)
        n_test = min(len(speakers) - 1, max(1, int(len(speakers) * test_fraction + 0.5)))
        test = sorted(i for s in speakers[:n_test] for i in groups[s])
    else:
        test = []
        for label in sorted(groups):
            idx = groups[label][:]
            rng.shuffle(idx)
            n_test = max(1, int(len(idx) * test_fraction + 0.5)) if len(idx) > 1 else 0
            test.extend(idx[:n_test])
        test.sort()
    chosen = set(test)
    return [i for i in range(len(rows)) if i not in chosen], test


def _require_column(rows: list[dict], column: str) -> None:
    if rows and column not in rows[0]:
        raise ValueError(f"no column {column!r} in the manifest; columns: {', '.join(k for k in rows[0] if k != 'audio')}")


# --------------------------------------------------------------------------- probing
def probe_layers(x_train: np.ndarray, y_train, x_test: np.ndarray, y_test, *, layers: list[int] | None = None,
                 Cs=(1.0,), cv_folds: int = 3, cv_groups=None, seed: int = 0) -> list[LayerResult]:
    """One standardised logistic-regression probe per layer.

    x_train: (train files, layers, dim), x_test: (test files, layers, dim). With several ``Cs``,
    C is chosen per layer by stratified ``cv_folds``-fold cross-validation on the training split;
    ``cv_groups`` (one per training file, e.g. speakers) keeps each group inside one fold, so that
    C is chosen the way the test split is made."""
    if x_train.ndim != 3 or x_test.ndim != 3 or x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"features must be (files, layers, dim) with equal layers and dim, "
                         f"got {x_train.shape} and {x_test.shape}")
    if len(set(y_train)) < 2:
        raise ValueError("the training split has fewer than 2 classes; nothing to probe")
    layers = list(range(x_train.shape[1])) if layers is None else list(layers)
    return [_probe_one(x_train[:, j], y_train, x_test[:, j], y_test, layer, list(Cs), cv_folds, cv_groups, seed)
            for j, layer in enumerate(layers)]


def _probe_one(xtr, ytr, xte, yte, layer, Cs, folds, groups, seed) -> LayerResult:
    sk = _sklearn()
    C = Cs[0] if len(Cs) == 1 else _choose_C(xtr, ytr, Cs, folds, groups, seed)
    clf = sk.pipeline.make_pipeline(sk.preprocessing.StandardScaler(),
                                    sk.linear_model.LogisticRegression(C=C, max_iter=2000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sk.exceptions.ConvergenceWarning)
        clf.fit(xtr, ytr)
    converged = not any(issubclass(w.category, sk.exceptions.ConvergenceWarning) for w in caught)
    return LayerResult(layer, float(clf.score(xte, yte)), float(clf.score(xtr, ytr)), float(C), converged)


def _choose_C(xtr, ytr, Cs, folds, groups, seed) -> float:
    sk = _sklearn()
    ms = sk.model_selection
    if groups is None:
        folds = min(folds, min(Counter(ytr).values()))
        cv = ms.StratifiedKFold(folds, shuffle=True, random_state=seed) if folds >= 2 else None
    else:
        folds = min(folds, len(set(groups)))
        cv = ms.StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if folds >= 2 else None
    if cv is None:
        return Cs[0]
    clf = sk.pipeline.make_pipeline(sk.preprocessing.StandardScaler(),
                                    sk.linear_model.LogisticRegression(max_iter=2000))
    search = ms.GridSearchCV(clf, {"logisticregression__C": Cs}, cv=cv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sk.exceptions.ConvergenceWarning)
        search.fit(xtr, ytr, **({} if groups is None else {"groups": groups}))
    return float(search.best_params_["logisticregression__C"])


def _sklearn():
    try:
        import sklearn.exceptions
        import sklearn.linear_model
        import sklearn.model_selection
        import sklearn.pipeline
        import sklearn.preprocessing
    except ImportError:
        raise ImportError("probing needs scikit-learn: pip install 'w2v2[probe]'") from None
    return sklearn


def chance_accuracy(y_train, y_test) -> float:
    """Accuracy of always answering the most frequent training label."""
    top = Counter(y_train).most_common(1)[0][0]
    return float(np.mean([y == top for y in y_test]))


# --------------------------------------------------------------------------- reporting
def format_table(results: list[LayerResult], chance: float | None = None) -> str:
    lines = ["layer  test acc  train acc      C", "-----  --------  ---------  -----"]
    for r in results:
        flag = "" if r.converged else "  (not converged)"
        lines.append(f"{r.layer:>5}  {r.accuracy:8.3f}  {r.train_accuracy:9.3f}  {r.C:5g}{flag}")
    if chance is not None:
        lines.append(f"chance (majority label): {chance:.3f}")
    return "\n".join(lines)


@dataclass
class Panel:
    """One subplot: accuracy by layer per model, plus flat baselines and chance."""

    curves: dict[str, tuple[list[int], list[float]]]  # model -> (layers, test accuracies)
    baselines: dict[str, float] | None = None
    chance: float | None = None


def plot_accuracy(panels: dict[str, Panel], path) -> None:
    """Test accuracy by layer, one subplot per title in ``panels``, one line per model;
    baselines dashed, chance dotted. PNG, written atomically."""
    from matplotlib.figure import Figure  # a bare figure: the caller's backend stays as it is

    from .fileio import atomic_open

    fig = Figure(figsize=(5.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, panel) in zip(axes[0], panels.items()):
        for name, (layers, acc) in panel.curves.items():
            ax.plot(layers, acc, marker="o", label=name)
        for k, (name, acc) in enumerate((panel.baselines or {}).items()):
            ax.axhline(acc, linestyle="--", color=f"C{len(panel.curves) + k}", label=name)
        if panel.chance is not None:
            ax.axhline(panel.chance, linestyle=":", color="grey", label="chance")
        ax.set_xlabel("layer (0 = Transformer input)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
