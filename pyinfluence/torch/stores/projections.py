"""Random projections of per-example gradients, φ = P g (P of shape (k, p)), for gradient stores.

Every projection is a small frozen configuration object (validated in ``__post_init__``; messages name the
field) with a ``seed``; the matrix P it stands for is a deterministic function of its configuration alone:

- :class:`Identity`: P = I_p (no projection; k = p).
- :class:`GaussianProjection`: P_ij ~ N(0, 1/k) i.i.d. (TRAK's projection).
- :class:`RademacherProjection`: P_ij = ±1/√k with equal probability.
- :class:`SparseJLProjection`: a sparse Johnson-Lindenstrauss transform (Kane & Nelson 2014, "Sparser
  Johnson-Lindenstrauss transforms", the block construction): every column has exactly ``nnz`` = s
  non-zeros ±1/√s, one in each of s blocks of about k/s rows. Applied with ``index_add_``, never densified.
- :class:`LoGraProjection`: LoGra's per-layer Kronecker-factored projection for ``nn.Linear`` layers (Choe et
  al. 2024, "What is your data worth to GPT?"): P = blockdiag_l (P_out,l ⊗ P_in,l), computed from one forward
  and one backward pass with hooks, never forming the per-example gradient.

**Scaling.** Each P satisfies E[PᵀP] = I_p (exactly PᵀP = I for :class:`Identity`): ⟨Pu, Pv⟩ is an unbiased
estimate of ⟨u, v⟩ (the Johnson-Lindenstrauss property), so −(P s_test)ᵀ(P g_i) is an unbiased estimate of the
exact ``up_loss`` −s_testᵀ g_i. For Rademacher and sparse JL the diagonal of PᵀP is exactly 1 (every column
has unit norm); for Gaussian it is 1 in expectation.

**Determinism.** P is generated on the CPU by ``torch.Generator`` objects seeded per block, so it is the same
matrix on every device and in every dtype (the entries are drawn in float32 as unit values ±1 or N(0, 1), exactly
representable in float64, and the scale 1/√k is applied to the product), and no call ever needs the whole (k, p)
matrix in memory: column block b of P (columns b·C … (b+1)·C − 1, C = ``block_cols``) is drawn from a generator
seeded with ``derive_seed(seed, 0, b)``. Columns do not depend on p: P for p columns is the first p columns of
the same infinite matrix. A block is drawn whole (C columns) and cut to the columns needed. Blocks are cached
per (device, dtype) when the whole matrix takes at most ``cache_bytes``; otherwise regenerated on every call
(then the generation costs as much as k·p random numbers per call — prefer :class:`SparseJLProjection` or
:class:`LoGraProjection` for large p).

``derive_seed(seed, *keys)`` is SplitMix64 chained over the keys (see :func:`derive_seed`); the seeds of the
generators are documented in each class, so that the matrices can be rebuilt independently.

**Threads**: projection objects are immutable; their block cache is guarded by a lock, so one object may be
shared by several threads.
"""

from __future__ import annotations

import abc
import hashlib
import math
import threading
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pyinfluence._validation import check_int

__all__ = [
    "GaussianProjection",
    "Identity",
    "LoGraProjection",
    "ParamLayout",
    "Projection",
    "RademacherProjection",
    "SparseJLProjection",
    "derive_seed",
    "projection_from_config",
]

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
# Default budget of the per-object block cache (bytes): the whole matrix is kept when it fits.
_CACHE_BYTES = 256 << 20
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ==============================================================================================
# seeds
# ==============================================================================================
def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea & Flood 2014) on a 64-bit unsigned integer."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """The seed of the generator of one block: ``h = splitmix64(seed)``, then ``h = splitmix64(h ^ key)`` for
    each key (keys reduced modulo 2⁶⁴), and finally ``h & (2⁶³ − 1)`` (a valid ``manual_seed``)."""
    h = _splitmix64(int(seed) & _MASK64)
    for key in keys:
        h = _splitmix64(h ^ (int(key) & _MASK64))
    return h & _MASK63


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _layer_key(path: str) -> int:
    """The key of a layer's factors in :class:`LoGraProjection`: the first 8 bytes (big-endian) of the
    SHA-256 of the module path, so that a layer's factors do not depend on which other layers are selected."""
    return int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big")


# ==============================================================================================
# the parameter layout
# ==============================================================================================
@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the selected parameters, in the order of the flat vector θ (p entries): what a
    projection needs to know about θ (only :class:`LoGraProjection` uses more than p)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes) or not self.names:
            raise ValueError("ParamLayout: names and shapes must be non-empty and of the same length")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def p(self) -> int:
        """The number of parameters."""
        return sum(self.sizes)

    @classmethod
    def of(cls, fm: Any) -> ParamLayout:
        """The layout of a :class:`~pyinfluence.torch.functional.FunctionalModel` (``names``, ``shapes``)."""
        return cls(tuple(fm.names), tuple(tuple(int(d) for d in s) for s in fm.shapes))


# ==============================================================================================
# the interface
# ==============================================================================================
class Projection(abc.ABC):
    """A linear map P: R^p → R^k of flat parameter-space vectors, with E[PᵀP] = I (see the module docstring).

    - :meth:`project` ``(V)``: the rows of V (B, p) projected, (B, k) = V Pᵀ, in V's dtype and device:
      per-example gradients, test gradients, or s_test vectors.
    - :meth:`project_examples` ``(fm, X, Y)``: the projected per-example gradients P ∇θL(z_i, θ̂) of one
      batch, (B, k): by default ``project(fm.per_example_grads(X, Y))`` (B × p memory);
      :class:`LoGraProjection` computes them without the per-example gradients.
    - :meth:`out_dim` ``(layout)``: k.
    - :meth:`config`: a JSON-ready dict that identifies P (kind, seed, parameters), stored in a gradient
      store's manifest; :func:`projection_from_config` inverts it.
    """

    kind: ClassVar[str]
    seed: int

    @abc.abstractmethod
    def out_dim(self, layout: ParamLayout | int) -> int:
        """k, the output dimension for parameters of this layout (or this p)."""

    @abc.abstractmethod
    def _apply(self, V: Tensor, layout: ParamLayout | None) -> Tensor:
        """V (B, p), validated → (B, k)."""

    def project(self, V: Tensor, layout: ParamLayout | None = None) -> Tensor:
        """V Pᵀ: the rows of ``V`` (B, p) (or one vector (p,)) projected, (B, k) (or (k,)), in V's dtype and
        on its device. ``layout``: the parameters' layout (required by :class:`LoGraProjection`; checked
        against p when given)."""
        if not isinstance(V, Tensor):
            raise TypeError(f"V must be a torch.Tensor of shape (B, p), got {type(V).__name__}")
        if not V.is_floating_point():
            raise TypeError(f"V must be a floating-point tensor, got {V.dtype}")
        if V.ndim not in (1, 2):
            raise ValueError(f"V must have shape (B, p) or (p,), got {tuple(V.shape)}")
        if layout is not None and V.shape[-1] != layout.p:
            raise ValueError(f"V has {V.shape[-1]} columns but the parameter layout has p = {layout.p}")
        if V.shape[-1] == 0:
            raise ValueError("V has no columns (p = 0)")
        one = V.ndim == 1
        out = self._apply(V.unsqueeze(0) if one else V, layout)
        return out[0] if one else out

    def project_examples(self, fm: Any, X: Any, Y: Tensor) -> Tensor:
        """P ∇θL(z_i, θ̂) for the examples of one batch, (B, k), in the functional model's dtype.

        Default: the per-example gradients (B, p) by ``vmap(grad)``, then :meth:`project`: memory B·p plus the
        projection's working set."""
        return self._apply(fm.per_example_grads(X, Y), ParamLayout.of(fm))

    def config(self) -> dict[str, Any]:
        """The JSON-ready identity of P: ``{"kind": ..., "seed": ..., <parameters>}`` (the cache budget is
        not part of it)."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name != "cache_bytes":
                out[f.name] = getattr(self, f.name)
        return out

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # copies (copy.copy / deepcopy) are rebuilt from the fields, with a fresh cache and lock
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    # -- the block cache shared by the random projections ---------------------------------------
    def _init_cache(self) -> None:
        object.__setattr__(self, "_cache", {})
        object.__setattr__(self, "_cache_lock", threading.Lock())

    def _cached(self, key: Any, make: Any, enabled: bool) -> Any:
        if not enabled:
            return make()
        cache: dict[Any, Any] = self.__dict__["_cache"]
        with self.__dict__["_cache_lock"]:
            hit = cache.get(key)
        if hit is not None:
            return hit
        value = make()
        with self.__dict__["_cache_lock"]:
            cache.setdefault(key, value)
        return value

    def clear_cache(self) -> None:
        """Drop the cached blocks of P (they are regenerated when needed)."""
        if "_cache" in self.__dict__:
            with self.__dict__["_cache_lock"]:
                self.__dict__["_cache"].clear()


def _check_seed(owner: str, seed: Any) -> int:
    return check_int(f"{owner}.seed", seed, 0, _MASK63)


def _check_cache(owner: str, value: Any) -> int:
    return check_int(f"{owner}.cache_bytes", value, 0)


# ==============================================================================================
# identity
# ==============================================================================================
@dataclass(frozen=True)
class Identity(Projection):
    """No projection: P = I_p, k = p, φ = g exactly (PᵀP = I). Memory of a store: n·p values.

    ``seed`` is ignored (kept for the common interface). Cost: none (``project`` returns V itself)."""

    kind: ClassVar[str] = "identity"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", _check_seed("Identity", self.seed))

    def out_dim(self, layout: ParamLayout | int) -> int:
        return layout if isinstance(layout, int) else layout.p

    def _apply(self, V: Tensor, layout: ParamLayout | None) -> Tensor:
        return V


# ==============================================================================================
# dense projections, drawn by column blocks
# ==============================================================================================
class _DenseProjection(Projection):
    """Shared code of the dense projections: P = Z / √k, column block b of Zᵀ (C × k) drawn by
    :meth:`_draw_block` from a generator seeded with ``derive_seed(seed, 0, b)``."""

    dim: int
    block_cols: int
    cache_bytes: int

    def _validate(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "dim", check_int(f"{owner}.dim", self.dim, 1))
        object.__setattr__(self, "seed", _check_seed(owner, self.seed))
        object.__setattr__(self, "block_cols", check_int(f"{owner}.block_cols", self.block_cols, 1))
        object.__setattr__(self, "cache_bytes", _check_cache(owner, self.cache_bytes))
        self._init_cache()

    def out_dim(self, layout: ParamLayout | int) -> int:
        return self.dim

    @abc.abstractmethod
    def _draw_block(self, gen: torch.Generator) -> Tensor:
        """Zᵀ's block (C, k), float32, unit entries."""

    def block(self, b: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """Block b of Zᵀ = √k·Pᵀ, shape (block_cols, dim): rows b·C … (b+1)·C − 1 of Pᵀ times √k (unit
        entries), on ``device`` in ``dtype``."""
        return self._draw_block(_generator(derive_seed(self.seed, 0, b))).to(device=device, dtype=dtype)

    def _cache_enabled(self, p: int) -> bool:
        return -(-p // self.block_cols) * self.block_cols * self.dim * 4 <= self.cache_bytes

    def _apply(self, V: Tensor, layout: ParamLayout | None) -> Tensor:
        B, p = V.shape
        C, k = self.block_cols, self.dim
        cache = self._cache_enabled(p)
        out = torch.zeros((B, k), dtype=V.dtype, device=V.device)
        for b, start in enumerate(range(0, p, C)):
            stop = min(p, start + C)

            def make(b: int = b) -> Tensor:
                return self._draw_block(_generator(derive_seed(self.seed, 0, b))).to(V.device, V.dtype)

            Zt = self._cached((b, V.device, V.dtype), make, cache)
            out.addmm_(V[:, start:stop], Zt[: stop - start])  # Y += V_b Z_bᵀ  (B, k)
        return out.mul_(1.0 / math.sqrt(k))


@dataclass(frozen=True)
class GaussianProjection(_DenseProjection):
    """Dense Gaussian projection: P_ij ~ N(0, 1/k) i.i.d., so E[PᵀP] = I_p (each column has E‖P_j‖² = 1,
    distinct columns are independent with mean zero).

    Output dimension k = ``dim``. Block b of Zᵀ = √k·Pᵀ is ``torch.randn(block_cols, dim,
    generator=torch.Generator("cpu").manual_seed(derive_seed(seed, 0, b)), dtype=torch.float32)``.
    Cost of ``project`` on (B, p): 2·B·p·k flops, plus drawing k·p normals when the matrix is not cached
    (k·p·4 bytes > ``cache_bytes``); memory block_cols·k for one block (or k·p when cached) plus B·k."""

    kind: ClassVar[str] = "gaussian"
    dim: int
    seed: int = 0
    block_cols: int = 2048
    cache_bytes: int = _CACHE_BYTES

    def __post_init__(self) -> None:
        self._validate()

    def _draw_block(self, gen: torch.Generator) -> Tensor:
        return torch.randn(self.block_cols, self.dim, generator=gen, dtype=torch.float32)


@dataclass(frozen=True)
class RademacherProjection(_DenseProjection):
    """Dense Rademacher projection: P_ij = ±1/√k with equal probability, i.i.d., so diag(PᵀP) = 1 exactly and
    E[PᵀP] = I_p.

    Output dimension k = ``dim``. Block b of Zᵀ = √k·Pᵀ is ``2·torch.randint(0, 2, (block_cols, dim),
    generator=torch.Generator("cpu").manual_seed(derive_seed(seed, 0, b))) − 1`` (as float32). Cost as
    :class:`GaussianProjection`: 2·B·p·k flops; memory block_cols·k (or k·p when cached) plus B·k."""

    kind: ClassVar[str] = "rademacher"
    dim: int
    seed: int = 0
    block_cols: int = 2048
    cache_bytes: int = _CACHE_BYTES

    def __post_init__(self) -> None:
        self._validate()

    def _draw_block(self, gen: torch.Generator) -> Tensor:
        bits = torch.randint(0, 2, (self.block_cols, self.dim), generator=gen)
        return (bits * 2 - 1).to(torch.float32)


# ==============================================================================================
# sparse JL
# ==============================================================================================
@dataclass(frozen=True)
class SparseJLProjection(Projection):
    """Sparse Johnson-Lindenstrauss transform, the block construction of Kane & Nelson (2014): the k rows are
    split into s = ``nnz`` blocks, block c holding rows ⌊c·k/s⌋ … ⌊(c+1)·k/s⌋ − 1, and every column j has
    exactly one non-zero in each block, ±1/√s at a uniformly chosen row, signs and rows independent. So every
    column has unit norm (diag(PᵀP) = 1 exactly) and E[PᵀP] = I_p (off-diagonal entries are sums of
    independent zero-mean sign products).

    Output dimension k = ``dim`` (≥ nnz). For column block b (columns b·C …, C = ``block_cols``), a generator
    seeded with ``derive_seed(seed, 0, b)`` draws ``u = torch.rand(C, s, dtype=torch.float64)`` then
    ``bits = torch.randint(0, 2, (C, s))``; column b·C + j has the non-zero of block c at row ⌊c·k/s⌋ +
    ⌊u[j, c]·(⌊(c+1)·k/s⌋ − ⌊c·k/s⌋)⌋ with sign 2·bits[j, c] − 1.

    Applied with ``index_add_`` (never densified): cost B·p·s multiply-adds for (B, p); memory B·C·s for one
    block plus B·k, and C·s indices per block (cached for the whole matrix when p·s·12 bytes ≤
    ``cache_bytes``). On CUDA, ``index_add_`` accumulates with atomics, so the rounding of the sums may vary
    between runs (the matrix does not); ``torch.use_deterministic_algorithms(True)`` makes it reproducible.
    """

    kind: ClassVar[str] = "sparse_jl"
    dim: int
    nnz: int = 4
    seed: int = 0
    block_cols: int = 4096
    cache_bytes: int = _CACHE_BYTES

    def __post_init__(self) -> None:
        owner = "SparseJLProjection"
        object.__setattr__(self, "dim", check_int(f"{owner}.dim", self.dim, 1))
        object.__setattr__(
            self, "nnz", check_int(f"{owner}.nnz", self.nnz, 1, self.dim, maximum_what=f"{owner}.dim")
        )
        object.__setattr__(self, "seed", _check_seed(owner, self.seed))
        object.__setattr__(self, "block_cols", check_int(f"{owner}.block_cols", self.block_cols, 1))
        object.__setattr__(self, "cache_bytes", _check_cache(owner, self.cache_bytes))
        self._init_cache()

    def out_dim(self, layout: ParamLayout | int) -> int:
        return self.dim

    def block(self, b: int) -> tuple[Tensor, Tensor]:
        """Column block b: (rows (C, s) int64, signs (C, s) int64 ±1) on the CPU, as in the class docstring."""
        C, s, k = self.block_cols, self.nnz, self.dim
        gen = _generator(derive_seed(self.seed, 0, b))
        u = torch.rand(C, s, generator=gen, dtype=torch.float64)
        bits = torch.randint(0, 2, (C, s), generator=gen)
        c = torch.arange(s, dtype=torch.int64)
        lo = (c * k) // s
        size = ((c + 1) * k) // s - lo
        rows = lo + torch.floor(u * size).to(torch.int64).minimum(size - 1)
        return rows, bits * 2 - 1

    def _apply(self, V: Tensor, layout: ParamLayout | None) -> Tensor:
        B, p = V.shape
        C, s = self.block_cols, self.nnz
        cache = -(-p // C) * C * s * 12 <= self.cache_bytes
        out = torch.zeros((B, self.dim), dtype=V.dtype, device=V.device)
        for b, start in enumerate(range(0, p, C)):
            stop = min(p, start + C)
            w = stop - start

            def make(b: int = b) -> tuple[Tensor, Tensor]:
                rows, signs = self.block(b)
                return rows.to(V.device), signs.to(device=V.device, dtype=V.dtype)

            rows, signs = self._cached((b, V.device, V.dtype), make, cache)
            vals = V[:, start:stop].unsqueeze(2) * signs[:w]  # (B, w, s): ±V_ij for each non-zero
            out.index_add_(1, rows[:w].reshape(-1), vals.reshape(B, w * s))  # Y[:, r_jc] += ±V_ij
        return out.mul_(1.0 / math.sqrt(s))


# ==============================================================================================
# LoGra
# ==============================================================================================
@dataclass(frozen=True)
class _Layer:
    """One Linear layer of a LoGra projection: its parameters' positions in θ and in φ."""

    path: str
    weight: str | None
    bias: str | None
    n_out: int
    n_in: int  # the weight's input features (0 when only the bias is selected)
    w_offset: int  # offset of the weight's block in θ (−1 if not selected)
    b_offset: int  # offset of the bias's block in θ (−1 if not selected)
    k_out: int
    k_in: int
    offset: int  # offset of the layer's k_out·k_in block in φ

    @property
    def n_cols(self) -> int:
        """in' = in (weight selected) + 1 (bias selected): the columns of the layer's matrix [W b]."""
        return (self.n_in if self.weight is not None else 0) + (1 if self.bias is not None else 0)


@dataclass(frozen=True)
class LoGraProjection(Projection):
    """LoGra (Choe et al. 2024): for every selected ``nn.Linear`` layer l with parameter matrix M_l = [W b]
    (out × in', in' = in + 1 with the bias, the bias being the last column), the layer's block of φ is

        φ_l = vec(P_out M_l P_inᵀ) = (P_out ⊗ P_in) vec(M_l)      (k_out × k_in, row-major vec)

    with P_in (k_in × in') and P_out (k_out × out) independent, entries N(0, 1/k) (``base="gaussian"``) or
    ±1/√k (``base="rademacher"``), k_in = min(``dim_in``, in'), k_out = min(``dim_out``, out); a factor whose
    requested size is at least the layer's is the identity (exact; projecting to ≥ the size gains nothing).
    E[(P_out ⊗ P_in)ᵀ(P_out ⊗ P_in)] = E[P_outᵀP_out] ⊗ E[P_inᵀP_in] = I, so E[PᵀP] = I. The layers appear in
    φ in the order of their first selected parameter; output dimension k = Σ_l k_out,l·k_in,l.

    For the per-example gradient of a Linear layer, ∇_W L_i = Σ_t δ_t a_tᵀ (t over the positions when the
    input is (B, T, in), or any (B, …, in)), δ_t = ∂(Σ_j L_j)/∂s_t the gradient of the summed batch loss with
    respect to the layer's output s (per example, since L_i depends on example i only), and ā_t = [a_t, 1]:

        φ_l(z_i) = Σ_t (P_out δ_t)(P_in ā_t)ᵀ

    computed by :meth:`project_examples` from one forward pass (hooks record a_t and s_t) and one backward
    pass to the outputs s — the per-example gradient (out × in') is never formed. Cost per batch and layer:
    B·T·(out·k_out + in'·k_in + k_out·k_in) multiply-adds; memory B·T·(k_out + k_in) + B·k_out·k_in plus the
    activations of one forward/backward pass. A layer applied several times per forward pass contributes the
    sum of its calls (its gradient is that sum). :meth:`project` applies the same P to flat vectors (B, p)
    (such as s_test), forming P_out M P_inᵀ per layer (B·(out·in'·k_in + out·k_out·k_in) multiply-adds).

    Factor generation: P_in (k_in × in') is ``Z / √k_in`` with Z = ``torch.randn(k_in, in', generator=
    torch.Generator("cpu").manual_seed(derive_seed(seed, key, 0)), dtype=torch.float32)`` (Rademacher:
    ``2·torch.randint(0, 2, (k_in, in'), generator=...) − 1``), P_out likewise from ``derive_seed(seed, key,
    1)``, with ``key`` the first 8 bytes (big-endian) of the SHA-256 of the layer's module path (e.g.
    ``"encoder.fc1"``): a layer's factors do not depend on the other layers selected.

    Every selected parameter must be the ``weight`` or ``bias`` of an ``nn.Linear`` (ValueError naming it
    otherwise); inputs must have the batch first.
    """

    kind: ClassVar[str] = "logra"
    dim_in: int = 16
    dim_out: int = 16
    seed: int = 0
    base: str = "gaussian"

    def __post_init__(self) -> None:
        owner = "LoGraProjection"
        object.__setattr__(self, "dim_in", check_int(f"{owner}.dim_in", self.dim_in, 1))
        object.__setattr__(self, "dim_out", check_int(f"{owner}.dim_out", self.dim_out, 1))
        object.__setattr__(self, "seed", _check_seed(owner, self.seed))
        if self.base not in ("gaussian", "rademacher"):
            raise ValueError(f"{owner}.base must be 'gaussian' or 'rademacher', got {self.base!r}")
        self._init_cache()

    # -- the layers ---------------------------------------------------------------------------------
    def layers(self, layout: ParamLayout) -> list[_Layer]:
        """The layout's parameters grouped into Linear layers (by module path, weight (out, in) / bias (out,)),
        in the order of their first parameter. Raises ValueError naming a parameter that is not a 2-D
        ``weight`` or a 1-D ``bias``, or a weight and bias that disagree."""
        groups: dict[str, dict[str, Any]] = {}
        off = 0
        for name, shape, size in zip(layout.names, layout.shapes, layout.sizes):
            path, _, attr = name.rpartition(".")
            ok = (attr == "weight" and len(shape) == 2) or (attr == "bias" and len(shape) == 1)
            if not ok:
                raise ValueError(
                    f"LoGraProjection supports nn.Linear layers only (a 2-D 'weight' and a 1-D 'bias'); "
                    f"parameter {name!r} has shape {tuple(shape)}. Select only Linear layers' parameters "
                    f"with params=[...], or use GaussianProjection / SparseJLProjection"
                )
            g = groups.setdefault(path, {})
            g[attr] = (name, shape, off)
            off += size
        out: list[_Layer] = []
        pos = 0
        for path, g in groups.items():
            w, b = g.get("weight"), g.get("bias")
            n_out = int(w[1][0]) if w is not None else int(g["bias"][1][0])
            n_in = int(w[1][1]) if w is not None else 0
            if w is not None and b is not None and int(b[1][0]) != n_out:
                raise ValueError(
                    f"LoGraProjection: {b[0]!r} has {b[1][0]} entries but {w[0]!r} has {n_out} rows; not a "
                    f"Linear layer"
                )
            n_cols = (n_in if w is not None else 0) + (1 if b is not None else 0)
            k_in, k_out = min(self.dim_in, n_cols), min(self.dim_out, n_out)
            out.append(
                _Layer(
                    path=path,
                    weight=w[0] if w is not None else None,
                    bias=b[0] if b is not None else None,
                    n_out=n_out,
                    n_in=n_in,
                    w_offset=w[2] if w is not None else -1,
                    b_offset=b[2] if b is not None else -1,
                    k_out=k_out,
                    k_in=k_in,
                    offset=pos,
                )
            )
            pos += k_out * k_in
        return out

    def check_model(self, model: nn.Module, layout: ParamLayout) -> None:
        """ValueError naming the first selected parameter that is not the ``weight`` or ``bias`` of an
        ``nn.Linear`` module of ``model``."""
        for name in layout.names:
            path, _, attr = name.rpartition(".")
            try:
                module: Any = model.get_submodule(path)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
                owner = type(module).__name__ if module is not None else "no module"
                raise ValueError(
                    f"LoGraProjection supports nn.Linear layers only; parameter {name!r} belongs to {owner}. "
                    f"Select only the Linear layers' parameters with params=[...], or use GaussianProjection / "
                    f"SparseJLProjection"
                )

    def out_dim(self, layout: ParamLayout | int) -> int:
        if not isinstance(layout, ParamLayout):
            raise TypeError("LoGraProjection.out_dim needs the parameter layout (a ParamLayout), not p")
        return sum(ly.k_out * ly.k_in for ly in self.layers(layout))

    def _requested(self, which: int) -> int:
        return self.dim_in if which == 0 else self.dim_out

    def _factor(self, path: str, which: int, n: int) -> Tensor:
        """Z (k × n), float32 unit entries, unscaled (which = 0: P_in, 1: P_out); the identity (n × n) when
        the requested k is at least n."""
        k = self._requested(which)
        if k >= n:
            return torch.eye(n, dtype=torch.float32)
        gen = _generator(derive_seed(self.seed, _layer_key(path), which))
        if self.base == "gaussian":
            return torch.randn(k, n, generator=gen, dtype=torch.float32)
        return (torch.randint(0, 2, (k, n), generator=gen) * 2 - 1).to(torch.float32)

    def _scaled_factors(self, ly: _Layer, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(P_out (k_out × out), P_in (k_in × in')) of a layer, scaled, on ``device`` in ``dtype`` (cached)."""

        def make() -> tuple[Tensor, Tensor]:
            Zo = self._factor(ly.path, 1, ly.n_out)
            Zi = self._factor(ly.path, 0, ly.n_cols)
            so = 1.0 if self._requested(1) >= ly.n_out else 1.0 / math.sqrt(ly.k_out)
            si = 1.0 if self._requested(0) >= ly.n_cols else 1.0 / math.sqrt(ly.k_in)
            Po = Zo.to(torch.float64).mul_(so).to(device=device, dtype=dtype)
            Pi = Zi.to(torch.float64).mul_(si).to(device=device, dtype=dtype)
            return Po, Pi

        key = (ly.path, ly.k_out, ly.n_out, ly.k_in, ly.n_cols, device, dtype)
        return self._cached(key, make, True)

    def factors(self, layout: ParamLayout) -> list[tuple[str, Tensor, Tensor]]:
        """``[(module path, P_out (k_out × out), P_in (k_in × in'))]`` per layer, float64 on the CPU, scaled
        (the Kronecker factors of the class docstring; the bias is the last column of P_in's input)."""
        return [
            (ly.path, *self._scaled_factors(ly, torch.device("cpu"), torch.float64))
            for ly in self.layers(layout)
        ]

    # -- flat vectors -----------------------------------------------------------------------------
    def _apply(self, V: Tensor, layout: ParamLayout | None) -> Tensor:
        if layout is None:
            raise ValueError(
                "LoGraProjection.project needs the parameters' layout (layout=ParamLayout(names, shapes)) "
                "to find each Linear layer's block of V"
            )
        B = V.shape[0]
        lys = self.layers(layout)
        out = torch.empty((B, sum(ly.k_out * ly.k_in for ly in lys)), dtype=V.dtype, device=V.device)
        for ly in lys:
            Po, Pi = self._scaled_factors(ly, V.device, V.dtype)
            parts = []
            if ly.weight is not None:
                parts.append(
                    V[:, ly.w_offset : ly.w_offset + ly.n_out * ly.n_in].reshape(B, ly.n_out, ly.n_in)
                )
            if ly.bias is not None:
                parts.append(V[:, ly.b_offset : ly.b_offset + ly.n_out].unsqueeze(2))
            M = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (B, out, in')
            blk = Po @ (M @ Pi.t())  # P_out M P_inᵀ (B, k_out, k_in)
            out[:, ly.offset : ly.offset + ly.k_out * ly.k_in] = blk.reshape(B, -1)
        return out

    # -- per-example gradients through hooks ----------------------------------------------------------
    def project_examples(self, fm: Any, X: Any, Y: Tensor) -> Tensor:
        """φ_l(z_i) = Σ_t (P_out δ_t)(P_in ā_t)ᵀ per layer for the batch (X, Y): (B, k) in fm's dtype, from one
        forward pass with hooks on the Linear modules and one backward pass of Σ_i L_i to their outputs."""
        from pyinfluence.torch.batches import batch_len
        from pyinfluence.torch.functional import _per_example

        layout = ParamLayout.of(fm)
        lys = self.layers(layout)
        self.check_model(fm.model, layout)
        B = batch_len(X)
        captured: dict[str, list[tuple[Tensor, Tensor]]] = {ly.path: [] for ly in lys}

        def make_hook(path: str) -> Any:
            def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
                if not inputs or not isinstance(inputs[0], Tensor):
                    raise ValueError(
                        f"LoGraProjection: the Linear layer {path or 'the model'!r} was called without a "
                        f"positional input tensor; call Linear modules as layer(x)"
                    )
                captured[path].append((inputs[0].detach(), output))

            return hook

        with fm.hooked_module() as module:
            handles = []
            try:
                for ly in lys:
                    handles.append(module.get_submodule(ly.path).register_forward_hook(make_hook(ly.path)))
                leaves = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
                with torch.enable_grad():
                    outputs = fm.forward(leaves, X)
                    total = _per_example(fm.loss_fn(outputs, Y), B).sum()
            finally:
                for h in handles:
                    h.remove()
        calls = [(ly, a, s) for ly in lys for a, s in captured[ly.path]]
        out = torch.zeros((B, sum(ly.k_out * ly.k_in for ly in lys)), dtype=fm.dtype, device=fm.device)
        if not calls:
            return out
        with torch.enable_grad():
            deltas = torch.autograd.grad(total, [s for _, _, s in calls], allow_unused=True)
        for (ly, a, s), d in zip(calls, deltas):
            label = ly.path or "the model"
            wrong_in = ly.weight is not None and a.shape[-1] != ly.n_in
            if a.ndim < 2 or a.shape[0] != B or wrong_in or s.shape[0] != B or s.shape[:-1] != a.shape[:-1]:
                raise ValueError(
                    f"LoGraProjection: the Linear layer {label!r} received an input of shape {tuple(a.shape)} "
                    f"for a batch of {B} examples; inputs must be (batch, ..., in_features) with the batch first"
                )
            if d is None:  # the loss does not depend on this call's output
                continue
            Po, Pi = self._scaled_factors(ly, fm.device, fm.dtype)
            A = a.reshape(B, -1, a.shape[-1]).to(fm.dtype)  # (B, T, in)
            D = d.detach().reshape(B, -1, ly.n_out).to(fm.dtype)  # (B, T, out)
            pd = D @ Po.t()  # P_out δ_t   (B, T, k_out)
            if ly.weight is not None:
                pa = A @ Pi[:, : ly.n_in].t()  # P_in a_t   (B, T, k_in)
                if ly.bias is not None:
                    pa = pa + Pi[:, ly.n_in]  # P_in ā_t = P_in[:, :in] a_t + P_in[:, in]·1
            else:  # only the bias: ā_t = [1]
                pa = Pi[:, 0].expand(A.shape[0], A.shape[1], ly.k_in)
            blk = pd.transpose(1, 2) @ pa  # Σ_t (P_out δ_t)(P_in ā_t)ᵀ   (B, k_out, k_in)
            out[:, ly.offset : ly.offset + ly.k_out * ly.k_in] += blk.reshape(B, -1)
        return out


# ==============================================================================================
# configurations
# ==============================================================================================
_KINDS: dict[str, type[Projection]] = {
    c.kind: c
    for c in (Identity, GaussianProjection, RademacherProjection, SparseJLProjection, LoGraProjection)
}


def projection_from_config(cfg: Any) -> Projection:
    """The projection a :meth:`Projection.config` dict describes (ValueError for an unknown kind or fields)."""
    if not isinstance(cfg, dict) or "kind" not in cfg:
        raise ValueError(f"a projection configuration is a dict with a 'kind' entry, got {cfg!r}")
    kind = cfg["kind"]
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown projection kind {kind!r}; known: {', '.join(sorted(_KINDS))}")
    allowed = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    params = {k: v for k, v in cfg.items() if k != "kind"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"projection configuration of kind {kind!r} has unknown fields {unknown}")
    return cls(**params)


def resolve_projection(projection: Any) -> Projection:
    """``None`` → :class:`Identity`; a :class:`Projection` as it is; TypeError otherwise."""
    if projection is None:
        return Identity()
    if isinstance(projection, Projection):
        return projection
    raise TypeError(
        "projection must be None (no projection) or a Projection object such as "
        f"GaussianProjection(dim=1024), SparseJLProjection(dim=4096), LoGraProjection(); got {projection!r}"
    )
