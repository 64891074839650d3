"""The optional CUDA path of LinearInfluence (pyinfluence/_cuda.py over the kernels of csrc/cuda).

- Routing and its errors, on every machine: device=None/"cpu" is the CPU engine; a bad device value is a ValueError;
  device="cuda" without the kernels in the build, or without a GPU torch can see, is a RuntimeError saying which.
- The Python side of the GPU path (pyinfluence/_cuda.py and the hook in linear.py) on every machine: the kernels
  replaced by numpy implementations of their contract (pyinfluence/cuda.hpp: row-major device arrays behind raw
  pointers) on CPU tensors, compared with the CPU engine.
- GPU against CPU (skipped cleanly without a CUDA build and a GPU): every accelerated quantity agrees with the CPU
  engine to 1e-10 relative in float64 and 1e-4 in float32 (relative to the largest magnitude of the quantity);
  the queries that fall back to the CPU engine give its exact answers; CUDA tensor inputs select the GPU.
The kernels themselves are also checked without a GPU, on the host emulator (tests/cpp, test_cuda_emulated), and
test_cpp.py compiles the CUDA build wherever nvcc is installed.
"""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np
import pytest

import pyinfluence as pi
from pyinfluence import _core


def _gpu_reason() -> str:
    """Why the GPU comparisons cannot run here ('' when they can)."""
    if not _core.has_cuda:
        return "pyinfluence was built without CUDA kernels (PYINFLUENCE_CUDA=1 pip install . to build them)"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    if _core.cuda_device_count() == 0:
        return f"pyinfluence's kernels see no CUDA device ({_core.cuda_version()})"
    return ""


pytestmark = pytest.mark.cuda

GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "a GPU is available")


def _problem(kind: str, n: int = 300, d: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    if kind == "ridge":
        y = X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n)
        return X, y, pi.RidgeRegression(l2=1e-2).fit(X, y)
    K = 3 if kind.startswith("multinomial") else 2
    W = rng.standard_normal((K, d))
    y = np.argmax(X @ W.T + 0.8 * rng.standard_normal((n, K)), axis=1)
    if kind == "svm":
        return X, y, pi.SmoothHingeSVM(l2=1e-2, temperature=0.5).fit(X, y)
    return X, y, pi.LogisticRegression(l2=1e-2).fit(X, y)


# -- routing and errors (every machine) ---------------------------------------------------------------------------
def test_has_cuda_is_a_build_flag() -> None:
    assert isinstance(_core.has_cuda, bool)
    assert hasattr(_core, "cuda_device_count") == _core.has_cuda


def test_cpu_device() -> None:
    X, y, model = _problem("logistic", n=60)
    default = pi.LinearInfluence(model, X, y)
    cpu = pi.LinearInfluence(model, X, y, device="cpu")
    assert default.device == "cpu" and cpu.device == "cpu"
    np.testing.assert_array_equal(default.up_loss(X[:3], y[:3]), cpu.up_loss(X[:3], y[:3]))


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", 3])
def test_bad_device_value(device) -> None:
    X, y, model = _problem("logistic", n=40)
    with pytest.raises(ValueError, match="device must be"):
        pi.LinearInfluence(model, X, y, device=device)


@pytest.mark.skipif(not GPU_REASON, reason="a GPU is available: device='cuda' works here")
def test_cuda_unavailable_is_a_clear_error() -> None:
    X, y, model = _problem("logistic", n=40)
    if not _core.has_cuda:
        match = "built without its CUDA kernels.*PYINFLUENCE_CUDA=1"
    else:
        match = "sees no CUDA GPU|kernels see 0 device"
    with pytest.raises(RuntimeError, match=match):
        pi.LinearInfluence(model, X, y, device="cuda")


def _close(gpu, cpu, rtol) -> None:
    gpu, cpu = np.asarray(gpu, dtype=np.float64), np.asarray(cpu, dtype=np.float64)
    assert gpu.shape == cpu.shape
    scale = max(np.abs(cpu).max(), np.finfo(np.float64).tiny)
    err = np.abs(gpu - cpu).max() / scale
    assert err <= rtol, f"max relative error {err:.3e} > {rtol:g}"


# (Damping 1e-2: with 1e-3 the flat intercept direction of the multinomial costs float32 about 1e-4 relative in
# up_params on the CPU as well.)
CASES = [("logistic", 0.0), ("multinomial", 0.0), ("multinomial", 1e-2), ("svm", 0.0), ("ridge", 0.0)]


# -- the Python side of the GPU path, on the CPU (every machine) ----------------------------------------------------
def _view(address: int, shape, dtype) -> np.ndarray:
    """A writable numpy view of the memory behind a raw pointer (here: a CPU tensor's data_ptr())."""
    ctype = {
        np.dtype(np.float64): ctypes.c_double,
        np.dtype(np.float32): ctypes.c_float,
        np.dtype(np.int64): ctypes.c_int64,
    }[np.dtype(dtype)]
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctype * count).from_address(address)).reshape(shape)


class _HostKernels:
    """numpy implementations of the contract of the _core.cuda_* functions (pyinfluence/cuda.hpp): raw pointers to
    row-major arrays, written in place. Everything else is the real _core."""

    def __getattr__(self, name):
        return getattr(_core, name)

    @staticmethod
    def _augmented(spec, X):
        return np.hstack([X, np.ones((X.shape[0], 1), X.dtype)]) if spec.fit_intercept else X

    def cuda_per_example(self, spec, dt, device, stream, X, y, W, n, d, loss, R, C):
        K, de = spec.n_outputs, d + int(spec.fit_intercept)
        Xv, yv, Wv = _view(X, (n, d), dt), _view(y, (n,), dt), _view(W, (K, de), dt)
        s = (self._augmented(spec, Xv) @ Wv.T).astype(np.float64)
        if spec.family == "multinomial":
            if np.any((yv < 0) | (yv >= K) | (yv != np.floor(yv))):
                raise ValueError("y is not a valid label")
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            r, c = p.copy(), p
            r[np.arange(n), yv.astype(int)] -= 1
        elif spec.family == "logistic":
            q = 1 / (1 + np.exp(-s[:, 0]))
            r, c = (q - yv)[:, None], (q * (1 - q))[:, None]
        elif spec.family == "smooth_hinge":
            q = 1 / (1 + np.exp(-(1 - yv * s[:, 0]) / spec.temperature))
            r, c = (-yv * q)[:, None], (q * (1 - q) / spec.temperature)[:, None]
        else:
            r, c = (s[:, 0] - yv)[:, None], np.ones((n, 1))
        _view(R, (n, K), dt)[:] = r
        _view(C, (n, K), dt)[:] = c

    def cuda_hessian(self, spec, dt, device, stream, X, C, n, d, H):
        K, de = spec.n_outputs, d + int(spec.fit_intercept)
        Xa = self._augmented(spec, _view(X, (n, d), dt)).astype(np.float64)
        Cv = _view(C, (n, K), dt).astype(np.float64)
        out = np.zeros((K * de, K * de))
        for a in range(K):
            for b in range(K):  # D_i[a, b]: binary c_i; multinomial p_a δ_ab − p_a p_b
                w = Cv[:, 0] if K == 1 else (a == b) * Cv[:, a] - Cv[:, a] * Cv[:, b]
                out[a * de : (a + 1) * de, b * de : (b + 1) * de] = Xa.T @ (w[:, None] * Xa) / n
        pen = np.full((K, de), spec.l2)
        if spec.fit_intercept and not spec.penalize_intercept:
            pen[:, d] = 0.0
        _view(H, (K * de, K * de), dt)[:] = out + np.diag(pen.ravel())

    def _scores(self, spec, dt, X, R, n, d, S, m):
        K, de = spec.n_outputs, d + int(spec.fit_intercept)
        Xa = self._augmented(spec, _view(X, (n, d), dt))
        G = (_view(R, (n, K), dt)[:, :, None] * Xa[:, None, :]).reshape(n, K * de)
        return -G @ _view(S, (m, K * de), dt).T  # (n, m)

    def cuda_up_loss(self, spec, dt, device, stream, X, R, n, d, S, m, out):
        _view(out, (n, m), dt)[:] = self._scores(spec, dt, X, R, n, d, S, m)

    def cuda_top_k(self, spec, dt, device, stream, X, R, n, d, S, m, k, hi, hv, ri, rv):
        sc = self._scores(spec, dt, X, R, n, d, S, m)
        idx = np.arange(n)
        for t in range(m):  # (score, index) order; harmful: largest score first
            help_order = np.lexsort((idx, sc[:, t]))[:k]
            harm_order = np.lexsort((idx, -sc[:, t]))[:k]
            _view(hi, (m, k), np.int64)[t] = help_order
            _view(hv, (m, k), dt)[t] = sc[help_order, t]
            _view(ri, (m, k), np.int64)[t] = harm_order
            _view(rv, (m, k), dt)[t] = sc[harm_order, t]


@pytest.fixture
def host_gpu_path(monkeypatch):
    """device="cuda" routed to CudaLinearEngine on CPU tensors, with _HostKernels in place of the kernels."""
    import torch

    from pyinfluence.linear import cuda as _cuda

    class HostEngine(_cuda.CudaLinearEngine):
        def _on_device(self):
            return contextlib.nullcontext()

        def _stream(self) -> int:
            return 0

    monkeypatch.setattr(_cuda, "_core", _HostKernels())

    def resolve(device, X_train=None):  # "cuda…" → the host engine; None/"cpu" → the CPU engine, as before
        return torch.device("cpu") if str(device).startswith("cuda") else None

    monkeypatch.setattr(_cuda, "resolve_device", resolve)
    monkeypatch.setattr(_cuda, "CudaLinearEngine", HostEngine)
    return HostEngine


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind,damping", CASES)
def test_gpu_path_glue_on_cpu(host_gpu_path, kind: str, damping: float, dtype) -> None:
    X, y, model = _problem(kind)
    cpu = pi.LinearInfluence(model, X, y, damping=damping, dtype=dtype)
    gpu = pi.LinearInfluence(model, X, y, damping=damping, dtype=dtype, device="cuda")
    assert isinstance(gpu._engine, host_gpu_path) and isinstance(cpu._engine, _core.LinearEngine)
    _compare(gpu, cpu, X, y, dtype)


def test_gpu_path_not_positive_definite_on_cpu(host_gpu_path) -> None:
    import warnings

    X, y, _ = _problem("logistic", n=80)
    X = np.hstack([X, np.zeros((80, 1))])  # a zero column and no l2: H has a zero pivot
    model = pi.LogisticRegression(l2=1e-2).fit(X, y)
    model.l2 = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pi.NotAtOptimumWarning)
        with pytest.raises(pi.NotPositiveDefiniteError, match="damping"):
            pi.LinearInfluence(model, X, y, device="cuda")
        inf = pi.LinearInfluence(model, X, y, damping=1e-3, device="cuda")
    assert np.all(np.isfinite(inf.up_loss(X[:2], y[:2])))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the numpy host kernels
def test_gpu_path_never_returns_or_ranks_non_finite_values_on_cpu(host_gpu_path) -> None:
    """The GPU path's checks against non-finite results, with the host kernels: an overflowing test point is named; the streaming
    top-k kernel is refused beforehand when a bound says its scores could overflow; an overflowing training set is
    an overflow, not a damping problem."""
    X, y, model = _problem("ridge")
    gpu = pi.LinearInfluence(model, X, y, device="cuda")
    for query in (lambda Xt, yt: gpu.up_loss(Xt, yt), lambda Xt, yt: gpu.top_k(Xt, yt, 3)):
        with pytest.raises(pi.NonFiniteError, match="X_test is the likely cause"):
            query(X[:2] * 1e200, y[:2])
    np.testing.assert_array_equal(
        gpu.top_k(X[:2], y[:2], 3).helpful_idx,
        pi.LinearInfluence(model, X, y).top_k(X[:2], y[:2], 3).helpful_idx,
    )
    gpu32 = pi.LinearInfluence(model, X, y, device="cuda", dtype=np.float32)
    with pytest.raises(pi.NonFiniteError, match="float32"):
        gpu32.top_k(X[:2] * 1e19, y[:2], 3)  # gradients and s_test finite, the scores would not be
    X_bad = X.copy()
    X_bad[3] = 1e160
    with pytest.raises(pi.NonFiniteError, match="X_train is the likely cause"):
        pi.LinearInfluence(model, X_bad, y, device="cuda")


# -- GPU against CPU (skipped without a GPU) ----------------------------------------------------------------------
def _compare(gpu, cpu, X, y, dtype) -> None:
    """Every query of two LinearInfluence objects on the same problem (X, y): accelerated ones to the tolerance of
    the dtype, the CPU fallbacks exactly."""
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    Xt, yt = X[:7] + 0.1, y[:7]
    idx = np.array([5, 0, 17, 299, 42])
    _close(gpu.hessian(), cpu.hessian(), rtol)
    assert gpu.grad_norm_ == pytest.approx(
        cpu.grad_norm_, rel=1e-3, abs=1e-12 if dtype == np.float64 else 1e-5
    )
    _close(gpu.up_loss(Xt, yt), cpu.up_loss(Xt, yt), rtol)
    _close(gpu.up_loss(Xt, yt, train_idx=idx), cpu.up_loss(Xt, yt, train_idx=idx), rtol)
    _close(gpu.up_loss(Xt[0], yt[0]), cpu.up_loss(Xt[0], yt[0]), rtol)  # a single test point
    _close(gpu.loo_change(Xt, yt), cpu.loo_change(Xt, yt), rtol)
    _close(gpu.self_influence(), cpu.self_influence(), rtol)
    _close(gpu.self_influence(idx), cpu.self_influence(idx), rtol)
    _close(gpu.up_params(idx), cpu.up_params(idx), rtol)
    _close(gpu.gradients(idx), cpu.gradients(idx), rtol)
    full = cpu.up_loss(Xt, yt)
    for k in (1, 10, 70):
        tg, tc = gpu.top_k(Xt, yt, k=k), cpu.top_k(Xt, yt, k=k)
        assert tg.helpful_idx.dtype == np.int64 and tg.helpful_idx.shape == (7, k)
        _close(tg.helpful_scores, tc.helpful_scores, rtol)
        _close(tg.harmful_scores, tc.harmful_scores, rtol)
        # Indices: the same points, up to the order of scores equal within the tolerance.
        _close(np.take_along_axis(full.T, tg.helpful_idx, axis=1), tc.helpful_scores, rtol)
        _close(np.take_along_axis(full.T, tg.harmful_idx, axis=1), tc.harmful_scores, rtol)
    # Without a kernel: the CPU engine's own answers.
    np.testing.assert_array_equal(gpu.pert_loss(Xt, yt, train_idx=idx), cpu.pert_loss(Xt, yt, train_idx=idx))
    np.testing.assert_array_equal(
        gpu.loo_change(Xt, yt, train_idx=idx, method="newton"),
        cpu.loo_change(Xt, yt, train_idx=idx, method="newton"),
    )
    if dtype == np.float64:
        np.testing.assert_array_equal(
            gpu.retrain_loo(Xt, yt, train_idx=idx[:2]), cpu.retrain_loo(Xt, yt, train_idx=idx[:2])
        )


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind,damping", CASES)
def test_gpu_matches_cpu(kind: str, damping: float, dtype) -> None:
    X, y, model = _problem(kind)
    cpu = pi.LinearInfluence(model, X, y, damping=damping, dtype=dtype)
    gpu = pi.LinearInfluence(model, X, y, damping=damping, dtype=dtype, device="cuda")
    assert gpu.device.startswith("cuda")
    _compare(gpu, cpu, X, y, dtype)


@needs_gpu
def test_gpu_top_k_streams_over_many_chunks() -> None:
    """n large enough for many row chunks and test-point tiles; indices equal (no ties in continuous data)."""
    X, y, model = _problem("logistic", n=40000, d=20, seed=3)
    Xt, yt = X[:40] * 0.5, y[:40]
    cpu = pi.LinearInfluence(model, X, y)
    gpu = pi.LinearInfluence(model, X, y, device="cuda")
    for k in (5, 64, 200):
        tg, tc = gpu.top_k(Xt, yt, k=k), cpu.top_k(Xt, yt, k=k)
        np.testing.assert_array_equal(tg.helpful_idx, tc.helpful_idx)
        np.testing.assert_array_equal(tg.harmful_idx, tc.harmful_idx)
        _close(tg.helpful_scores, tc.helpful_scores, 1e-10)
        _close(tg.harmful_scores, tc.harmful_scores, 1e-10)


@needs_gpu
def test_cuda_tensors_select_the_gpu() -> None:
    import torch

    X, y, model = _problem("multinomial", n=200)
    cpu = pi.LinearInfluence(model, X, y)
    gpu = pi.LinearInfluence(model, torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda())
    assert gpu.device.startswith("cuda")
    Xt = torch.from_numpy(X[:4]).cuda()
    _close(gpu.up_loss(Xt, torch.from_numpy(y[:4]).cuda()), cpu.up_loss(X[:4], y[:4]), 1e-10)
    with pytest.raises(ValueError):  # labels are still validated
        gpu.up_loss(X[:2], np.array([0, 7]))


@needs_gpu
def test_gpu_not_positive_definite() -> None:
    """A zero feature column and no l2: H has a zero pivot, on the GPU as on the CPU."""
    import warnings

    X, y, _ = _problem("logistic", n=80)
    X = np.hstack([X, np.zeros((80, 1))])
    model = pi.LogisticRegression(l2=1e-2).fit(X, y)
    model.l2 = 0.0  # same θ̂ (the zero column's weight is 0), objective without the penalty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pi.NotAtOptimumWarning)
        with pytest.raises(pi.NotPositiveDefiniteError, match="damping"):
            pi.LinearInfluence(model, X, y, device="cuda")
        inf = pi.LinearInfluence(model, X, y, damping=1e-3, device="cuda")  # damping cures it
    assert np.all(np.isfinite(inf.up_loss(X[:2], y[:2])))
