"""Evaluation on frozen features: feature extraction (with an on-disk cache), a linear probe whose
regularisation is chosen on the validation split, and a weighted kNN classifier.

Never select on test: every choice (C of the probe, k of kNN) is made on validation; test is scored once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitadapt.paths import CACHE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(img_size: int):
    from torchvision import transforms as T
    return T.Compose([T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class Transformed(Dataset):
    """Apply ``transform`` to the image of each (image, label) pair."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform
        self.targets = getattr(base, "targets", None)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, y = self.base[i]
        return self.transform(img), y


def pool_tokens(model: nn.Module, x: torch.Tensor, feature: str = "cls+avg") -> torch.Tensor:
    """Frozen features of a timm model: CLS token, mean patch token, or both (DinoV2 linear-probe harness).
    Models without tokens (CNNs) give their pooled features whatever ``feature`` says."""
    if feature not in ("cls", "avg", "cls+avg"):
        raise ValueError(f"feature={feature!r} is not valid; valid values: 'cls', 'avg', 'cls+avg'")
    if not hasattr(model, "num_prefix_tokens"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    tokens = model.forward_features(x)
    cls = tokens[:, 0]
    avg = tokens[:, model.num_prefix_tokens:].mean(1)
    return {"cls": cls, "avg": avg, "cls+avg": torch.cat([cls, avg], -1)}[feature]


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, img_size: int, batch_size: int = 64,
                     feature: str = "cls+avg", num_workers: int = 0, device: str | torch.device = "cpu",
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of every item of ``dataset`` (PIL images), in order."""
    model = model.to(device).eval()
    loader = DataLoader(Transformed(dataset, eval_transform(img_size)), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False)
    if progress:
        from tqdm.auto import tqdm
        loader = tqdm(loader, desc="features", leave=False)
    feats, labels = [], []
    for x, y in loader:
        feats.append(pool_tokens(model, x.to(device), feature).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """A cheap digest of the weights (a strided sample of every tensor), so cached features of one model
    are never served for another (two random inits, a backbone before and after adaptation)."""
    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        flat = t.detach().flatten()
        if flat.numel() == 0 or not flat.is_floating_point():
            continue
        sample = flat[:: max(1, flat.numel() // 64)].float().cpu().numpy()
        h.update(name.encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def _array_digest(ds) -> str:
    """sha256 of a dataset's ``images`` array (shape and bytes), computed once per dataset object."""
    if getattr(ds, "_vitadapt_digest", None) is None:
        a = np.ascontiguousarray(ds.images)
        h = hashlib.sha256(str((a.shape, a.dtype.str)).encode())
        h.update(memoryview(a).cast("B"))
        ds._vitadapt_digest = h.hexdigest()[:16]
    return ds._vitadapt_digest


def _item_keys(dataset: Dataset) -> list[str]:
    """Stable identities of the items: file paths where the dataset has them, else (class, index)."""
    base, idx = dataset, None
    if hasattr(dataset, "indices") and hasattr(dataset, "base"):
        base, idx = dataset.base, dataset.indices
    if hasattr(base, "paths"):
        keys = [str(p) for p in base.paths]
    elif hasattr(getattr(base, "ds", None), "samples"):          # torchgeo ImageFolder datasets
        keys = [str(s[0]) for s in base.ds.samples]
    else:
        desc = {k: getattr(base, k) for k in ("size", "style", "split", "seed", "n_per_class", "corners", "tile_size") if hasattr(base, k)}
        if isinstance(getattr(base, "images", None), np.ndarray):    # array-backed (Fashion-MNIST): the content
            desc["images"] = _array_digest(base)                      # tells its splits apart
        prefix = hashlib.sha256(json.dumps(desc, default=str, sort_keys=True).encode()).hexdigest()[:12] + type(base).__name__
        keys = [f"{prefix}:{i}" for i in range(len(base))]
    return keys if idx is None else [keys[i] for i in idx]


class FeatureCache:
    """Per-item feature cache on disk for one (backbone, resolution, feature) key: only missing items are
    computed, so seeds drawing different subsets of one pool share the work."""

    def __init__(self, key: dict, root: Path | None = None):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.path = Path(root or CACHE / "features") / f"{digest}.pt"
        self.store: dict[str, torch.Tensor] = self._read()

    def _read(self) -> dict[str, torch.Tensor]:
        """The features on disk for this key ({} when absent, unreadable or another key's)."""
        from vitadapt.data.cachefile import torch_load_or_none
        blob = torch_load_or_none(self.path, "feature cache", weights_only=False)
        ok = isinstance(blob, dict) and blob.get("key") == json.loads(json.dumps(self.key, default=str))
        return blob["features"] if ok else {}

    def features(self, model: nn.Module, dataset: Dataset, img_size: int, batch_size: int = 64,
                 feature: str = "cls+avg", num_workers: int = 0, device="cpu", progress: bool = False):
        from vitadapt.data import Subset
        keys = _item_keys(dataset)
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            X, _ = extract_features(model, Subset(dataset, missing), img_size, batch_size, feature, num_workers,
                                    device, progress)
            for i, row in zip(missing, X):
                self.store[keys[i]] = torch.from_numpy(row.copy())
            self._save()
        X = torch.stack([self.store[k] for k in keys]).numpy() if keys else np.zeros((0, 0), np.float32)
        y = np.asarray(dataset.targets)
        return X, y

    def _save(self):
        """Keep what other processes saved meanwhile, then write through a per-process temporary file."""
        from vitadapt.data.cachefile import torch_save_atomic
        self.store = {**self._read(), **self.store}
        torch_save_atomic({"key": json.loads(json.dumps(self.key, default=str)), "features": self.store}, self.path,
                          "feature cache")


def fit_logistic(X: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, max_iter: int = 300,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, the objective of scikit-learn's ``LogisticRegression(C)``
    (mean cross-entropy + ||W||^2 / (2 C n), bias not penalised), solved by full-batch L-BFGS in torch.
    scikit-learn's lbfgs took 25-120 s per C on 1,200 x 768 features on this 2-core machine; this takes ~1 s."""
    n, d = X.shape
    W = torch.zeros(d, num_classes) if init is None else init[0].clone()
    b = torch.zeros(num_classes) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")
    lam = 1.0 / (C * n)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, y) + 0.5 * lam * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def linear_probe(Xtr, ytr, Xva, yva, Xte, yte, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
                 max_iter: int = 100, seed: int = 0) -> dict:
    """Multinomial logistic regression on standardised features; C chosen by validation accuracy,
    then the chosen model is scored once on test. Cs are solved from strong to weak regularisation,
    each warm-started from the previous solution."""
    from sklearn.preprocessing import StandardScaler
    torch.manual_seed(seed)
    scaler = StandardScaler().fit(Xtr)
    t = lambda a: torch.as_tensor(scaler.transform(a), dtype=torch.float32)
    tr, va, te = t(Xtr), t(Xva), t(Xte)
    ytr_t = torch.as_tensor(ytr, dtype=torch.long)
    C_classes = int(max(ytr.max(), yva.max(), yte.max())) + 1
    acc = lambda Wb, X, y: float(((X @ Wb[0] + Wb[1]).argmax(1).numpy() == y).mean())
    best, val_curve, Wb = None, {}, None
    for C in sorted(Cs):
        Wb = fit_logistic(tr, ytr_t, C_classes, C, max_iter, Wb)
        val_curve[C] = acc(Wb, va, yva)
        if best is None or val_curve[C] > best[0]:
            best = (val_curve[C], C, Wb)
    val_acc, C, Wb = best
    return {"test_acc": acc(Wb, te, yte), "val_acc": val_acc, "C": C,
            "val_curve": {str(k): v for k, v in sorted(val_curve.items())}}


def knn_predict(Xtr, ytr, Xq, k: int = 20, T: float = 0.07, num_classes: int | None = None) -> np.ndarray:
    """Weighted kNN on cosine similarity (DINO's evaluation): votes weighted by exp(sim / T)."""
    tr = torch.nn.functional.normalize(torch.as_tensor(Xtr, dtype=torch.float32), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(Xq, dtype=torch.float32), dim=1)
    ytr_t = torch.as_tensor(ytr, dtype=torch.long)
    C = int(num_classes or int(ytr_t.max()) + 1)
    k = min(k, len(tr))
    sims, idx = (q @ tr.T).topk(k, dim=1)
    w = (sims / T).exp()
    votes = torch.zeros(len(q), C).scatter_add_(1, ytr_t[idx], w)
    return votes.argmax(1).numpy()


def knn_eval(Xtr, ytr, Xva, yva, Xte, yte, ks: Sequence[int] = (10, 20), T: float = 0.07) -> dict:
    """kNN accuracy with k chosen on validation."""
    C = int(max(ytr.max(), yva.max(), yte.max())) + 1
    scores = {k: float((knn_predict(Xtr, ytr, Xva, k, T, C) == yva).mean()) for k in ks}
    k = max(scores, key=scores.get)
    return {"test_acc": float((knn_predict(Xtr, ytr, Xte, k, T, C) == yte).mean()), "val_acc": scores[k], "k": k}
