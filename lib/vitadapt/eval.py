"""Evaluation on frozen features: feature extraction (with an on-disk cache), a linear probe whose
regularisation is chosen on the validation split, and a weighted kNN classifier.

Never select on test: every choice (C of the probe, k of kNN) is made on validation; test is scored once.

Everything runs on a given ``device`` (:func:`eval_device` picks it from a config's ``accelerator``): feature
extraction under the configured precision (:func:`autocast`), the L-BFGS probe, and kNN in bounded blocks of
queries x training rows with a running top-k. On the CPU in ``32-true`` every number is what it always was.
"""

from __future__ import annotations

import contextlib
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

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
KNN_CHUNK_Q = 1024          # queries per kNN block
KNN_CHUNK_TRAIN = 16384     # training rows per kNN block: a block is 1024 x 16384 fp32 = 64 MB


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def eval_device(accelerator: str = "auto") -> torch.device:
    """The device evaluation runs on for a config's ``accelerator``: CUDA (the current device) for auto/gpu/cuda
    when CUDA is available, else MPS for auto/gpu/mps when it is, else the CPU (auto, cpu). Asking for cuda, gpu or
    mps where it does not exist is a ValueError naming the value."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r} is not valid; valid values: {', '.join(map(repr, ACCELERATORS))}")
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if accelerator in ("auto", "gpu", "mps") and _mps_available():
        return torch.device("mps")
    if accelerator == "auto":
        return torch.device("cpu")
    raise ValueError(f"accelerator={accelerator!r} but no {'CUDA or MPS' if accelerator == 'gpu' else accelerator.upper()} "
                     f"device is available here; use accelerator='auto' or 'cpu' on this machine")


def autocast_dtype(device: str | torch.device, precision: str = "32-true") -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: bf16 for bf16-mixed/bf16-true, fp16 for 16-mixed, None
    (plain fp32) for 32-true and on the CPU, so that CPU numbers stay those of fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; valid values: {', '.join(map(repr, PRECISIONS))}")
    if torch.device(device).type == "cpu" or precision == "32-true":
        return None
    return torch.float16 if precision == "16-mixed" else torch.bfloat16


def autocast(device: str | torch.device, precision: str = "32-true"):
    """A context manager running the forward passes inside it in ``precision`` on ``device`` (torch autocast; the
    weights stay as they are): a null context for 32-true and on the CPU (see :func:`autocast_dtype`)."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def loader_options(num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                   device: str | torch.device | None = None) -> dict:
    """DataLoader keyword arguments from a config's loader settings, for every loader of the library.
    ``pin_memory`` applies only where batches go to a CUDA device (``device``'s type; without ``device``: when CUDA
    is available), ``persistent_workers`` only with ``num_workers > 0`` (both are ignored otherwise, so a profile's
    defaults never break a run with ``num_workers=0`` or on a CPU machine)."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r} is not valid; valid: an integer >= 0")
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return {"num_workers": num_workers, "pin_memory": bool(pin_memory) and cuda,
            "persistent_workers": bool(persistent_workers) and num_workers > 0}


NORMALIZATIONS = ("imagenet", "half", "weights")


def normalization(name: str = "imagenet", model: nn.Module | None = None) -> tuple[tuple, tuple]:
    """``(mean, std)`` of an input normalisation: "imagenet" (ImageNet statistics, the default everywhere),
    "half" (mean = std = 0.5, as the original ViT / RLRR code) or "weights" (the ``pretrained_cfg`` of ``model``,
    the timm model the weights were loaded into)."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"normalize={name!r} is not valid; valid values: {', '.join(map(repr, NORMALIZATIONS))}")
    if name == "half":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    if name == "weights":
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        if "mean" not in cfg or "std" not in cfg:
            raise ValueError("normalize='weights' needs a timm model with a pretrained_cfg holding mean and std; "
                             "use normalize='imagenet' or 'half'")
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def eval_transform(img_size: int, norm: tuple[tuple, tuple] | None = None):
    """PIL -> tensor: resize to ``img_size`` square (bicubic), normalise with ``norm`` = (mean, std) (default
    ImageNet's; :func:`normalization`)."""
    from torchvision import transforms as T
    mean, std = norm or (IMAGENET_MEAN, IMAGENET_STD)
    return T.Compose([T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.ToTensor(), T.Normalize(mean, std)])


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


def _model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without any)."""
    t = next(iter(model.parameters()), None)
    if t is None:
        t = next(iter(model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, img_size: int, batch_size: int = 64,
                     feature: str = "cls+avg", num_workers: int = 0, device: str | torch.device = "cpu",
                     progress: bool = False, precision: str = "32-true", pin_memory: bool = False,
                     persistent_workers: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of every item of ``dataset`` (PIL images), in order: ``model`` runs on ``device`` in
    ``precision`` (:func:`autocast`) and goes back where it was; features come back as float32 CPU arrays."""
    autocast_dtype(device, precision)                    # a bad precision fails before any work
    device = torch.device(device)
    home = _model_device(model)
    model = model.to(device).eval()
    opts = loader_options(num_workers, pin_memory, persistent_workers, device)
    loader = DataLoader(Transformed(dataset, eval_transform(img_size)), batch_size=batch_size, shuffle=False, **opts)
    if progress:
        from tqdm.auto import tqdm
        loader = tqdm(loader, desc="features", leave=False)
    feats, labels = [], []
    try:
        with autocast(device, precision):
            for x, y in loader:
                feats.append(pool_tokens(model, x.to(device, non_blocking=opts["pin_memory"]), feature).float().cpu())
                labels.append(torch.as_tensor(y))
    finally:
        model.to(home)
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
        from vitadapt.data.cachefile import KeyedFile
        self.key = key
        self.file = KeyedFile(root or CACHE / "features", key, "feature cache")
        self.path = self.file.path
        self.store: dict[str, torch.Tensor] = self._read()

    def _read(self) -> dict[str, torch.Tensor]:
        """The features on disk for this key ({} when absent, unreadable or another key's)."""
        return self.file.read() or {}

    def features(self, model: nn.Module, dataset: Dataset, img_size: int, batch_size: int = 64,
                 feature: str = "cls+avg", num_workers: int = 0, device="cpu", progress: bool = False,
                 precision: str = "32-true", pin_memory: bool = False, persistent_workers: bool = False):
        """``(X, y)`` of ``dataset``: cached rows, the missing ones computed by :func:`extract_features` on
        ``device`` in ``precision`` (the key should name a precision other than fp32, see :func:`autocast_dtype`)."""
        from vitadapt.data import Subset
        keys = _item_keys(dataset)
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            X, _ = extract_features(model, Subset(dataset, missing), img_size, batch_size, feature, num_workers,
                                    device, progress, precision, pin_memory, persistent_workers)
            for i, row in zip(missing, X):
                self.store[keys[i]] = torch.from_numpy(row.copy())
            self._save()
        X = torch.stack([self.store[k] for k in keys]).numpy() if keys else np.zeros((0, 0), np.float32)
        y = np.asarray(dataset.targets)
        return X, y

    def _save(self):
        """Keep what other processes saved meanwhile, then write through a per-process temporary file."""
        self.store = {**self._read(), **self.store}
        self.file.write(self.store)


def fit_logistic(X: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, max_iter: int = 300,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, the objective of scikit-learn's ``LogisticRegression(C)``
    (mean cross-entropy + ||W||^2 / (2 C n), bias not penalised), solved by full-batch L-BFGS in torch, on the
    device of ``X`` (``y`` and ``init`` are moved there; the weights come back there too).
    scikit-learn's lbfgs took 25-120 s per C on 1,200 x 768 features on this 2-core machine; this takes ~1 s."""
    n, d = X.shape
    y = y.to(X.device)
    W = torch.zeros(d, num_classes, device=X.device) if init is None else init[0].to(X.device).clone()
    b = torch.zeros(num_classes, device=X.device) if init is None else init[1].to(X.device).clone()
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
                 max_iter: int = 100, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Multinomial logistic regression on standardised features; C chosen by validation accuracy,
    then the chosen model is scored once on test. Cs are solved from strong to weak regularisation,
    each warm-started from the previous solution. The solver runs on ``device`` (float32)."""
    from sklearn.preprocessing import StandardScaler
    device = torch.device(device)
    torch.manual_seed(seed)
    scaler = StandardScaler().fit(Xtr)
    t = lambda a: torch.as_tensor(scaler.transform(a), dtype=torch.float32).to(device)
    tr, va, te = t(Xtr), t(Xva), t(Xte)
    ytr_t = torch.as_tensor(ytr, dtype=torch.long).to(device)
    C_classes = int(max(ytr.max(), yva.max(), yte.max())) + 1
    acc = lambda Wb, X, y: float(((X @ Wb[0] + Wb[1]).argmax(1).cpu().numpy() == y).mean())
    best, val_curve, Wb = None, {}, None
    for C in sorted(Cs):
        Wb = fit_logistic(tr, ytr_t, C_classes, C, max_iter, Wb)
        val_curve[C] = acc(Wb, va, yva)
        if best is None or val_curve[C] > best[0]:
            best = (val_curve[C], C, Wb)
    val_acc, C, Wb = best
    return {"test_acc": acc(Wb, te, yte), "val_acc": val_acc, "C": C,
            "val_curve": {str(k): v for k, v in sorted(val_curve.items())}}


def _similarity_block(q: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of one block of (normalised) queries and training rows: the only place kNN allocates
    a queries x training-rows matrix."""
    return q @ tr.T


def knn_topk(Xtr, Xq, k: int, device: str | torch.device = "cpu", chunk_q: int = KNN_CHUNK_Q,
             chunk_train: int = KNN_CHUNK_TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest cosine similarities of each query to the training rows and their indices ([n_q, k] each,
    on ``device``, sorted in decreasing order), computed in blocks of ``chunk_q`` queries x ``chunk_train`` training
    rows with a running top-k merge: besides the features, memory is one block and a [chunk_q, 2k] merge buffer,
    whatever the dataset sizes. Where one block holds everything this is exactly ``(q @ tr.T).topk(k)``."""
    for name, v in (("k", k), ("chunk_q", chunk_q), ("chunk_train", chunk_train)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} is not valid; valid: an integer >= 1")
    device = torch.device(device)
    tr = torch.nn.functional.normalize(torch.as_tensor(Xtr, dtype=torch.float32).to(device), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(Xq, dtype=torch.float32).to(device), dim=1)
    if len(tr) == 0:
        raise ValueError("Xtr has no rows; kNN needs at least one training row")
    k = min(k, len(tr))
    sims, idx = [], []
    for q0 in range(0, len(q), chunk_q):
        qc, best = q[q0:q0 + chunk_q], None
        for t0 in range(0, len(tr), chunk_train):
            s, i = _similarity_block(qc, tr[t0:t0 + chunk_train]).topk(min(k, len(tr) - t0, chunk_train), dim=1)
            i = i + t0
            if best is not None:                          # merge: the k best of the running k and this block's
                s, pos = torch.cat([best[0], s], 1).topk(min(k, best[0].shape[1] + s.shape[1]), dim=1)
                i = torch.cat([best[1], i], 1).gather(1, pos)
            best = (s, i)
        sims.append(best[0])
        idx.append(best[1])
    if not sims:
        return torch.zeros(0, k, device=device), torch.zeros(0, k, dtype=torch.long, device=device)
    return torch.cat(sims), torch.cat(idx)


def knn_predict(Xtr, ytr, Xq, k: int = 20, T: float = 0.07, num_classes: int | None = None,
                device: str | torch.device = "cpu", chunk_q: int = KNN_CHUNK_Q,
                chunk_train: int = KNN_CHUNK_TRAIN) -> np.ndarray:
    """Weighted kNN on cosine similarity (DINO's evaluation): votes weighted by exp(sim / T), on ``device`` in
    bounded blocks (:func:`knn_topk`). Ties between classes go to the lowest class index (``argmax``); a tie
    between training rows at the k-th place is broken as ``torch.topk`` breaks it."""
    ytr_t = torch.as_tensor(ytr, dtype=torch.long)
    C = int(num_classes or int(ytr_t.max()) + 1)
    sims, idx = knn_topk(Xtr, Xq, k, device, chunk_q, chunk_train)
    w = (sims / T).exp()
    votes = torch.zeros(len(sims), C, device=sims.device).scatter_add_(1, ytr_t.to(sims.device)[idx], w)
    return votes.argmax(1).cpu().numpy()


def knn_eval(Xtr, ytr, Xva, yva, Xte, yte, ks: Sequence[int] = (10, 20), T: float = 0.07,
             device: str | torch.device = "cpu", chunk_q: int = KNN_CHUNK_Q,
             chunk_train: int = KNN_CHUNK_TRAIN) -> dict:
    """kNN accuracy with k chosen on validation (each prediction on ``device`` in bounded blocks)."""
    C = int(max(ytr.max(), yva.max(), yte.max())) + 1
    pred = lambda Xq, k: knn_predict(Xtr, ytr, Xq, k, T, C, device, chunk_q, chunk_train)
    scores = {k: float((pred(Xva, k) == yva).mean()) for k in ks}
    k = max(scores, key=scores.get)
    return {"test_acc": float((pred(Xte, k) == yte).mean()), "val_acc": scores[k], "k": k}
