"""The built-in encoder: normalise on the atlas gene panel, scale, project onto PCs.

No downloaded weights; fitted on the reference when an atlas is built, and its
state (panel, gene means/scales, principal axes) is stored in the atlas file.

Every step is sparse-aware: the projection of a (cells x panel) CSR matrix is
``((T(X) - mean) / std) @ V = T(X) @ (V / std) - (mean / std) @ V`` so no cell
chunk is ever densified. ``T`` is ``log1p`` of counts per 10,000 panel counts
(``transform="log1p"``) or the within-cell rank score of each expressed panel
gene (``transform="rank"``, robust to depth and to differences between
technologies). Genes are scaled to unit variance before the PCA (``scale=True``)
unless the reference's within-label variation is only sampling noise (pseudo-cells
drawn from averaged profiles), where that variance is no measure of a gene's spread.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

from cellatlas.errors import AtlasModelMismatchError, GeneMismatchError
from cellatlas.sparse import ColumnPlan

TARGET_SUM = 1e4
TRANSFORMS = ("log1p", "rank")
FIT_MAX_CELLS = 50_000
"""The principal axes of a larger reference are fitted on a seeded sample of this many cells (the
dense centred matrix of every cell would take 4 bytes x cells x panel genes: 8 GB for 1M cells);
gene means and scales are still taken over every cell."""


def _transform(counts: sp.csr_matrix, transform: str, copy: bool = True) -> sp.csr_matrix:
    """Per-cell transform of panel counts (same sparsity); ``copy=False`` may reuse ``counts``' arrays."""
    x = sp.csr_matrix(counts, dtype=np.float32, copy=copy)
    if transform == "rank":
        from cellatlas.markers import rank_scores

        return rank_scores(x)
    size = np.asarray(x.sum(axis=1)).ravel()
    size[size == 0] = 1.0
    x.data *= np.repeat((TARGET_SUM / size).astype(np.float32), np.diff(x.indptr))
    np.log1p(x.data, out=x.data)
    return x


class DefaultEncoder:
    """PCA on a normalised gene panel, fitted on a reference.

    Parameters
    ----------
    panel
        Gene symbols the encoder reads, in column order of its parameters.
    mean, std
        Per-gene centre and scale of the transformed reference.
    components
        Principal axes ``[n_pcs, n_panel]``.
    transform
        ``"log1p"`` or ``"rank"`` (see module docstring).
    scaled
        Whether ``std`` holds the genes' standard deviations (``False``: all ones, the
        PCA was fitted on centred values only). Recorded so a refit can do the same.
    """

    name = "default"

    def __init__(self, panel: Sequence[str], mean: np.ndarray, std: np.ndarray, components: np.ndarray, transform: str = "rank", scaled: bool = True):
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}")
        self.panel = [str(g) for g in panel]
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        # C order whatever the source (a fitted SVD's strided view, an array read from a file), so
        # the weights below round alike for an encoder fitted here and one read back from its state.
        self.components = np.ascontiguousarray(components, dtype=np.float32)
        self.transform = transform
        self.scaled = bool(scaled)
        self._index = {g: i for i, g in enumerate(self.panel)}
        self._w = (self.components / self.std[None, :]).T.astype(np.float32)  # [panel, d]
        self._offset = ((self.mean / self.std) @ self.components.T).astype(np.float32)
        self._plans: dict[tuple[str, ...], tuple[ColumnPlan, np.ndarray]] = {}

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    # ----------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        counts: sp.csr_matrix,
        genes: Sequence[str],
        panel: Sequence[str],
        *,
        n_pcs: int = 50,
        transform: str = "rank",
        scale: bool = True,
        seed: int = 0,
    ) -> "DefaultEncoder":
        """Fit on reference counts restricted to ``panel`` (genes absent from ``genes`` are an error).

        With ``scale=False`` the PCA sees centred, unscaled values (``std`` is all ones).
        """
        cols = _columns(genes, panel)
        x = _transform(sp.csr_matrix(counts)[:, cols], transform)
        n = x.shape[0]
        mean = np.asarray(x.mean(axis=0)).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
        std = np.sqrt(np.maximum(sq - mean**2, 0.0))
        std = np.maximum(std, 1e-2 if transform == "rank" else 1e-1) if scale else np.ones_like(mean)
        k = int(min(n_pcs, n - 1, len(panel) - 1))
        # Centre/scale densely in float32, at most FIT_MAX_CELLS cells (all of them up to that size).
        if n > FIT_MAX_CELLS:
            x = x[np.sort(np.random.default_rng(seed).choice(n, FIT_MAX_CELLS, replace=False))]
        z = (x.toarray() - mean) / std
        from sklearn.utils.extmath import randomized_svd

        _, _, vt = randomized_svd(z, n_components=k, random_state=seed, n_iter=5)
        # Deterministic sign: largest-magnitude loading positive.
        signs = np.sign(vt[np.arange(k), np.abs(vt).argmax(axis=1)])
        vt *= signs[:, None]
        return cls(panel, mean, std, vt, transform=transform, scaled=scale)

    # ----------------------------------------------------------------- embedding
    def embed(self, counts: sp.csr_matrix, genes: Sequence[str]) -> np.ndarray:
        """Project cells; rows are L2-normalised (cosine geometry)."""
        plan, w = self._plan(tuple(genes))
        X = sp.csr_matrix(counts)
        x = plan.apply(X)
        x = _transform(x, self.transform, copy=x.data is X.data)
        e = np.asarray(x @ w, dtype=np.float32) - self._offset
        norm = np.linalg.norm(e, axis=1, keepdims=True)
        norm[norm == 0] = 1.0
        return (e / norm).astype(np.float32)

    def _plan(self, genes: tuple[str, ...]) -> tuple[ColumnPlan, np.ndarray]:
        """Selection of the panel genes in ``genes``' column order, and the weights in that order.

        The transform is per cell and order-free and the projection is a sum over
        genes, so reading the panel in the input's column order only permutes the
        rows of the weights, and the column selection keeps the input sorted.
        """
        plan = self._plans.get(genes)
        if plan is None:
            cols = _columns(genes, self.panel)
            order = np.argsort(cols, kind="stable")
            plan = (ColumnPlan.select(len(genes), cols[order]), np.ascontiguousarray(self._w[order]))
            if len(self._plans) >= 8:
                self._plans.pop(next(iter(self._plans)))
            self._plans[genes] = plan
        return plan

    def gene_coverage(self, genes: Sequence[str]) -> float:
        present = set(genes)
        return float(sum(g in present for g in self.panel)) / max(len(self.panel), 1)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.transform.encode())
        h.update("\x1f".join(self.panel).encode())
        for a in (self.mean, self.std, self.components):
            h.update(np.ascontiguousarray(a).tobytes())
        return "default-" + h.hexdigest()[:16]

    # ----------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Arrays to store in an atlas file."""
        return {
            "panel": np.asarray(self.panel, dtype=str),
            "mean": self.mean,
            "std": self.std,
            "components": self.components,
            "transform": np.asarray(self.transform),
            "scaled": np.asarray(self.scaled),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DefaultEncoder":
        return cls(
            [str(g) for g in state["panel"]],
            state["mean"],
            state["std"],
            state["components"],
            transform=str(state["transform"]),
            scaled=bool(state.get("scaled", True)),
        )


def _columns(genes: Sequence[str], panel: Sequence[str]) -> np.ndarray:
    index = {g: i for i, g in enumerate(genes)}
    missing = [g for g in panel if g not in index]
    if missing:
        raise GeneMismatchError(
            f"{len(missing)} of the encoder's {len(panel)} panel genes are missing from the input "
            f"(e.g. {', '.join(missing[:5])}).",
            fix="Annotate through cellatlas.annotate, which adapts the panel to the genes you have.",
            field="genes",
        )
    return np.fromiter((index[g] for g in panel), dtype=np.int64, count=len(panel))


def status(settings, model_path=None) -> dict[str, Any]:
    return {
        "name": "default",
        "usable": True,
        "reason": "built in: fitted per atlas, no weights to download",
        "path": None,
        "kind": "builtin",
    }


def load(*, atlas=None, model_path=None, settings=None, **_: Any) -> DefaultEncoder:
    """The default encoder fitted for ``atlas`` (its state lives in the atlas file)."""
    if atlas is None:
        raise AtlasModelMismatchError(
            "The default encoder is fitted per atlas and needs one.",
            fix="Pass atlas=... (e.g. 'human-core').",
            field="atlas",
        )
    return DefaultEncoder.from_state(atlas.encoder_state("default"))
