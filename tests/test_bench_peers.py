"""pyinfluence.bench.peers: other influence libraries side by side.

The peers (Captum, pyDVL, kronfluence) are not installed in CI: the tests that need them skip with the
reason (pyDVL and kronfluence run from ``$PYINFLUENCE_PEER_PYTHON``, e.g. /work/peers-venv/bin/python).
Everything else runs without them: the clean skip when a peer is missing, the worker's error
path, the payload (model description, torch.fx fallback, loss identification, parameter
selection), and the subprocess plumbing end to end through a stand-in ``captum`` package that
follows Captum's documented convention (sum Hessian + hessian_reg; scores (m, n)); the
normalised result is compared with a closed-form numpy computation of our up_loss.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyinfluence.bench import _peer_worker as worker
from pyinfluence.bench import peers
from pyinfluence.bench.tasks import Task

from helpers import cross_entropy as _ce


def _stand_in_task(model, loss_fn, X_train, y_train, X_test, y_test, l2, damping, name="tiny-logreg") -> Task:
    """A bench Task around a model built here (run_peers reads its torch view only)."""
    return Task(name, "deep", "a stand-in", model, loss_fn, X_train, y_train, X_test, y_test, l2, damping)


def _tiny_task(n=40, d=4, K=3, m=7, l2=0.05, damping=0.02, seed=0):
    rng = np.random.default_rng(seed)
    X = torch.tensor(rng.normal(size=(n, d)))
    y = torch.tensor(rng.integers(0, K, n))
    Xt = torch.tensor(rng.normal(size=(m, d)))
    yt = torch.tensor(rng.integers(0, K, m))
    model = nn.Linear(d, K).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(rng.normal(size=(K, d)) * 0.3))
        model.bias.copy_(torch.tensor(rng.normal(size=K) * 0.1))
    return _stand_in_task(model.eval(), _ce, X, y, Xt, yt, l2, damping)


def _numpy_up_loss(task: Task) -> np.ndarray:
    """Closed form for multinomial logistic regression: explicit Hessian, np.linalg.solve.

    up_loss[i, j] = −g_tjᵀ (H + λI)⁻¹ g_i, H = mean CE Hessian + l2·I; θ = (W row-major, b)."""
    W = task.model.weight.detach().numpy()
    b = task.model.bias.detach().numpy()
    X, y = task.X_train.numpy(), task.y_train.numpy()

    def probs(Xn):
        Z = Xn @ W.T + b
        P = np.exp(Z - Z.max(1, keepdims=True))
        return P / P.sum(1, keepdims=True)

    def grads(Xn, yn):
        E = probs(Xn)
        E[np.arange(len(yn)), yn] -= 1.0
        return np.hstack([(E[:, :, None] * Xn[:, None, :]).reshape(len(Xn), -1), E])

    P = probs(X)
    K, d = W.shape
    H = np.zeros((K * d + K, K * d + K))
    for i in range(len(X)):
        S = np.diag(P[i]) - np.outer(P[i], P[i])
        xa = np.append(X[i], 1.0)  # (w_k, then b): reorder below
        Hi = np.kron(S, np.outer(xa, xa))  # per class blocks of (d+1)
        # permutation from (class, [x, 1]) to (W row-major, b)
        idx = [k * (d + 1) + j for k in range(K) for j in range(d)] + [k * (d + 1) + d for k in range(K)]
        H += Hi[np.ix_(idx, idx)] / len(X)
    H += (task.l2 + task.damping) * np.eye(H.shape[0])
    G = grads(X, y)
    Gt = grads(task.X_test.numpy(), task.y_test.numpy())
    return -(G @ np.linalg.solve(H, Gt.T))


# pyDVL's separate venv, if the developer has one (read before the fixture below unsets it)
PEER_PYTHON = os.environ.get(peers.ENV_PEER_PYTHON)


@pytest.fixture(autouse=True)
def _no_external_peers(monkeypatch):
    # every test chooses its interpreters explicitly
    monkeypatch.delenv(peers.ENV_PEER_PYTHON, raising=False)
    peers._probe.cache_clear()


# ------------------------------------------------------------------------------------------------
# clean skip, worker error path, worker independence
# ------------------------------------------------------------------------------------------------
def test_missing_peer_is_a_peerrun_with_error(monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "_local_ok", lambda peer: False)
    av = peers.available_peers()
    assert set(av) == {"captum", "pydvl", "kronfluence"}
    assert av["captum"].startswith("not installed") and "pip install captum==0.9.0" in av["captum"]
    assert "PYINFLUENCE_PEER_PYTHON" in av["pydvl"] and "numpy<2" in av["pydvl"]
    assert "--no-deps kronfluence==1.0.1" in av["kronfluence"] and "torch==2.13.0" in av["kronfluence"]
    # an interpreter that does not exist: still a reason, no exception
    bad = str(tmp_path / "nope" / "python")
    assert "does not run" in peers.available_peers(peer_python=bad)["pydvl"]

    task = _tiny_task()
    runs = peers.run_peers(task, peers=("captum", "pydvl", "kronfluence", "nosuchlib"), peer_python=bad)
    labels = {(r.library, r.method) for r in runs}
    for peer in ("captum", "pydvl", "kronfluence"):
        for label in peers.peer_methods(peer):
            assert (peer, label) in labels
    for r in runs:
        assert isinstance(r, peers.PeerRun)
        assert r.error and r.up_loss is None and r.time_s is None and not r.ok
        json.dumps(r.to_dict())
    assert any("unknown peer" in r.error for r in runs if r.library == "nosuchlib")


def _run_worker(payload_dir, *extra, python=sys.executable, timeout=60):
    cmd = [python, worker.__file__, str(payload_dir), *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_worker_error_path_on_bad_payload(tmp_path):
    cases = {
        "garbage": "{this is not json",
        "unknown_peer": json.dumps({"peer": "nosuch", "method": "X", "settings": {}}),
        "no_data": json.dumps(
            {"peer": "captum", "method": "NaiveInfluenceFunction", "settings": {}, "warm_up": False}
        ),
    }
    for name, text in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "payload.json").write_text(text)
        r = _run_worker(d)
        assert r.returncode == 0, r.stderr
        res = json.loads((d / "result.json").read_text())
        assert res["error"], name
        assert res["traceback"] and not (d / "result.npz").exists()
        assert res["total_s"] >= 0
    assert "nosuch" in json.loads((tmp_path / "unknown_peer" / "result.json").read_text())["error"]
    # a directory that does not exist at all: output still written (to OUT_DIR)
    out = tmp_path / "out"
    r = _run_worker(tmp_path / "missing", out)
    assert r.returncode == 0
    assert json.loads((out / "result.json").read_text())["error"].startswith("FileNotFoundError")


def test_worker_never_imports_pyinfluence():
    tree = ast.parse(pathlib.Path(worker.__file__).read_text())
    allowed = {
        "__future__",
        "contextlib",
        "json",
        "logging",
        "math",
        "os",
        "sys",
        "time",
        "traceback",
        "warnings",
        "resource",
        "importlib",
        "collections",
        "hashlib",
        "io",
        "numpy",
        "torch",
        "captum",
        "pydvl",
        "kronfluence",
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the worker"
            assert node.module.split(".")[0] in allowed, node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                assert a.name.split(".")[0] in allowed, a.name
    r = subprocess.run(
        [sys.executable, worker.__file__, "--probe"], capture_output=True, text=True, timeout=60
    )
    info = json.loads(r.stdout)
    assert set(info["peers"]) == {"captum", "pydvl", "kronfluence"} and info["torch"]


# ------------------------------------------------------------------------------------------------
# payload: model description, fx fallback, loss identification, params
# ------------------------------------------------------------------------------------------------
class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.f = nn.Linear(8, 3)

    def forward(self, x):
        return self.f(F.max_pool2d(torch.tanh(self.c(x)), 2).flatten(1))


def test_model_payload_round_trip(tmp_path):
    torch.manual_seed(0)
    X = torch.randn(6, 64, dtype=torch.float64)
    seq = (
        nn.Sequential(
            nn.Linear(64, 5), nn.Tanh(), nn.Sequential(nn.ReLU(), nn.Linear(5, 3)), nn.Softplus(beta=2.0)
        )
        .double()
        .eval()
    )
    desc = peers._save_model(seq, str(tmp_path / "model.pt"), X)
    assert desc["format"] == "spec"
    json.dumps(desc)
    back = worker._load_model(str(tmp_path), json.loads(json.dumps(desc)), torch.float64)
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in seq.named_parameters()]
    torch.testing.assert_close(back(X), seq(X), rtol=0, atol=0)
    # a custom class: saved as a torch.fx GraphModule (generated code + standard layers); the
    # worker's process loading it without the class is checked end to end below
    cnn = _SmallCNN().double().eval()
    Xc = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    (tmp_path / "fx").mkdir()
    desc = peers._save_model(cnn, str(tmp_path / "fx" / "model.pt"), Xc)
    assert desc["format"] == "fx" and len(desc["sha256"]) == 64
    with pytest.raises(ValueError, match="refusing to unpickle"):  # no digest in the environment
        worker._load_model(str(tmp_path / "fx"), desc, torch.float64)
    os.environ[worker.MODEL_DIGEST_ENV] = desc["sha256"]
    try:
        back = worker._load_model(str(tmp_path / "fx"), desc, torch.float64)
    finally:
        del os.environ[worker.MODEL_DIGEST_ENV]
    assert type(back) is not _SmallCNN and isinstance(back, torch.fx.GraphModule)
    assert sorted(n for n, _ in back.named_parameters()) == sorted(n for n, _ in cnn.named_parameters())
    torch.testing.assert_close(back(Xc), cnn(Xc), rtol=0, atol=0)


class _Payload:
    """Unpickling this runs code: the attack that a replaced model.pt would carry."""

    def __reduce__(self):
        return (os.system, ("touch " + os.environ["PYINFLUENCE_TEST_PWNED"],))


def test_worker_refuses_a_replaced_model_file(tmp_path, monkeypatch):
    """The worker unpickles model.pt (the torch.fx format) only if its bytes are the ones the benchmark
    wrote; a file swapped in by someone else is refused before any of it is unpickled."""
    cnn = _SmallCNN().double().eval()
    Xc = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    desc = peers._save_model(cnn, str(tmp_path / "model.pt"), Xc)
    monkeypatch.setenv(worker.MODEL_DIGEST_ENV, desc["sha256"])
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("PYINFLUENCE_TEST_PWNED", str(pwned))
    torch.save(_Payload(), str(tmp_path / "model.pt"))  # the attacker's file
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        worker._load_model(str(tmp_path), desc, torch.float64)
    assert not pwned.exists()


@pytest.mark.slow
def test_kept_payloads_live_in_a_private_folder(tmp_path, monkeypatch):
    """keep_dir may be shared: the payloads (the worker script among them) go to a new 0700 folder in it."""
    task = _tiny_task()
    _install_fake_captum(tmp_path, monkeypatch)
    keep = tmp_path / "shared"
    keep.mkdir(mode=0o777)
    (run,) = peers.run_peers(
        task,
        peers=("captum",),
        num_threads=1,
        warm_up=False,
        keep_dir=str(keep),
        methods=[
            {
                "library": "captum",
                "method": "NaiveInfluenceFunction",
                "label": "exact",
                "settings": {"projection_dim": "p", "fake_mode": "exact"},
            }
        ],
    )
    assert run.error is None, run.error
    (private,) = list(keep.iterdir())
    assert private.name.startswith("peers-") and (private.stat().st_mode & 0o777) == 0o700
    assert (private / "_peer_worker.py").exists() and (private / "data" / "model.pt").exists()


def test_loss_identification_matches_pyinfluence_losses():
    import functools

    from pyinfluence.torch.losses import smooth_hinge_loss

    torch.manual_seed(0)
    X = torch.randn(20, 5, dtype=torch.float64)
    lin1 = nn.Linear(5, 1).double()
    lin3 = nn.Linear(5, 3).double()
    y01 = (torch.rand(20) > 0.5).double()
    ypm = 2.0 * y01 - 1.0
    y3 = torch.randint(0, 3, (20,))

    def logistic(out, y):
        return F.binary_cross_entropy_with_logits(out.reshape(-1), y, reduction="none")

    got = peers._identify_loss(_ce, lin3, X, y3)
    assert got == {"name": "cross_entropy"}
    assert peers._identify_loss(logistic, lin1, X, y01) == {"name": "logistic"}
    assert peers._identify_loss(smooth_hinge_loss, lin1, X, ypm) == {
        "name": "smooth_hinge",
        "temperature": 0.1,
    }
    hinge3 = functools.partial(smooth_hinge_loss, temperature=0.37)
    assert peers._identify_loss(hinge3, lin1, X, ypm)["temperature"] == 0.37
    mse = peers._identify_loss(
        lambda o, y: ((o - y) ** 2).mean(1), lin3, X, torch.randn(20, 3, dtype=torch.float64)
    )
    assert mse == {"name": "mse_mean"}
    with pytest.raises(ValueError, match="cannot tell which loss"):
        peers._identify_loss(lambda o, y: o.reshape(-1).abs() ** 3, lin1, X, ypm)
    # the worker's loss equals pyinfluence's smooth hinge where softplus is linear, too
    s = torch.tensor([[-100.0], [0.3], [50.0]], dtype=torch.float64)
    yy = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    f = worker._per_example_loss({"name": "smooth_hinge", "temperature": 0.001})
    torch.testing.assert_close(f(s, yy), smooth_hinge_loss(s, yy, temperature=0.001))


def test_params_selection_names():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert peers._resolve_params(m, None) is None
    assert peers._resolve_params(m, ["2"]) == ["2.weight", "2.bias"]
    assert peers._resolve_params(m, "0.bias") == ["0.bias"]
    assert peers._resolve_params(m, lambda n: n.endswith("weight")) == ["0.weight", "2.weight"]
    with pytest.raises(ValueError):
        peers._resolve_params(m, ["nothing"])
    assert worker._captum_layers(m, ["2.weight", "2.bias"]) == ["2"]
    assert worker._captum_layers(m, [n for n, _ in m.named_parameters()]) is None
    with pytest.raises(ValueError, match="partly"):
        worker._captum_layers(m, ["2.weight"])


# ------------------------------------------------------------------------------------------------
# end to end through a stand-in "captum" (Captum's documented convention), no peer installed
# ------------------------------------------------------------------------------------------------
_FAKE_CAPTUM = '''
"""Stand-in for captum.influence with Captum's documented convention: scores (m, n) =
g_tᵀ (Σ_i ∇²L_i + hessian_reg·I)⁻¹ g_i (a SUM Hessian), loss_fn per example."""
import time
import torch
from torch.func import functional_call, grad, hessian, vmap


class NaiveInfluenceFunction:
    def __init__(self, model, loader, checkpoint, layers=None, loss_fn=None, batch_size=1,
                 projection_dim=50, hessian_reg=1e-6, fake_mode="exact"):
        import os
        assert os.path.exists(checkpoint)
        self.model, self.loss, self.reg, self.mode = model, loss_fn, hessian_reg, fake_mode
        X = torch.cat([b[0] for b in loader])
        Y = torch.cat([b[1] for b in loader])
        self._train = (X, Y)
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        H = hessian(lambda t: self._loss(t, X, Y).sum())(self.theta)
        self.H = H + hessian_reg * torch.eye(len(H), dtype=H.dtype)
        if fake_mode == "sleep":
            time.sleep(120)
        if fake_mode == "raise":
            raise RuntimeError("fake failure inside the peer")

    def _loss(self, t, X, Y):
        ps, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = s.numel()
            ps[n] = t[i:i + k].reshape(s)
            i += k
        return self.loss(functional_call(self.model, ps, (X,)), Y)

    def _g(self, X, Y):
        return vmap(grad(lambda t, x, y: self._loss(t, x[None], y[None]).sum()),
                    in_dims=(None, 0, 0))(self.theta, X, Y)

    def influence(self, batch):
        Xt, Yt = batch
        G = self._g(*self._train)
        S = torch.linalg.solve(self.H, self._g(Xt, Yt).T)
        out = (G @ S).T
        if self.mode == "nan":
            out[0, 0] = float("nan")
        return out
'''


def _install_fake_captum(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepeer" / "captum"
    (pkg / "influence").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = 'fake'\n")
    (pkg / "influence" / "__init__.py").write_text(_FAKE_CAPTUM)
    root = str(tmp_path / "fakepeer")
    monkeypatch.syspath_prepend(root)
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for mod in [m for m in sys.modules if m == "captum" or m.startswith("captum.")]:
        monkeypatch.delitem(sys.modules, mod)


@pytest.mark.slow
def test_end_to_end_with_stand_in_peer(tmp_path, monkeypatch):
    task = _tiny_task()
    _install_fake_captum(tmp_path, monkeypatch)
    ref = _numpy_up_loss(task)
    assert peers.available_peers()["captum"] is None

    def cfg(label, mode):
        return {
            "library": "captum",
            "method": "NaiveInfluenceFunction",
            "label": label,
            "settings": {"projection_dim": "p", "fake_mode": mode},
        }

    runs = peers.run_peers(
        task,
        peers=("captum",),
        num_threads=1,
        warm_up=False,
        keep_dir=str(tmp_path / "k"),
        methods=[cfg("exact", "exact"), cfg("nan", "nan")],
    )
    ok, nan = runs
    assert ok.error is None, (ok.error, ok.details.get("traceback"))
    assert ok.up_loss.shape == (40, 7) and ok.up_loss.dtype == np.float64
    np.testing.assert_allclose(ok.up_loss, ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    assert ok.settings["hessian_reg"] == pytest.approx(40 * 0.07)
    assert ok.settings["projection_dim"] == 15
    assert ok.time_s > 0 and ok.peak_mem_mb > 0 and ok.details["load_s"] > 0
    assert "-n * scores.T" in ok.details["normalisation"]
    assert nan.up_loss is None and "non-finite scores: 1 NaN" in nan.error
    # a model of a custom class (torch.fx payload) loads in the worker without the class; an
    # exception inside the peer is a PeerRun with the peer's message and traceback
    torch.manual_seed(0)
    Xc = torch.randn(12, 1, 4, 4, dtype=torch.float64)
    cnn_task = _stand_in_task(
        _SmallCNN().double().eval(), _ce, Xc, torch.arange(12) % 3, Xc[:3], torch.arange(3), 0.01, 0.1
    )
    (err,) = peers.run_peers(
        cnn_task, peers=("captum",), num_threads=1, warm_up=False, methods=[cfg("raise", "raise")]
    )
    assert err.up_loss is None and "fake failure inside the peer" in err.error
    assert "RuntimeError" in err.details["traceback"]
    # timeout: killed, reported, no exception
    (slow,) = peers.run_peers(
        task, peers=("captum",), timeout_s=1.5, warm_up=False, methods=[cfg("sleep", "sleep")]
    )
    assert slow.error.startswith("timeout") and slow.up_loss is None


# ------------------------------------------------------------------------------------------------
# the real peers, where installed (not in CI)
# ------------------------------------------------------------------------------------------------
def test_captum_normalised_equals_closed_form():
    pytest.importorskip("captum", reason="Captum not installed: pip install 'pyinfluence[compare]'")
    task = _tiny_task()
    ref = _numpy_up_loss(task)
    (r,) = peers.run_peers(
        task, peers=("captum",), methods=["NaiveInfluenceFunction"], num_threads=1, warm_up=False
    )
    assert r.error is None, (r.error, r.details.get("traceback"))
    # Captum adds hessian_reg through a float32 identity: ~1e-8 relative, not 1e-15
    err = np.abs(r.up_loss - ref).max() / np.abs(ref).max()
    assert err < 1e-6, err


def test_pydvl_normalised_equals_closed_form():
    py = PEER_PYTHON
    reason = peers.available_peers(peer_python=py)["pydvl"]
    if reason:
        pytest.skip(f"pyDVL not available: {reason[:120]}")
    task = _tiny_task()
    ref = _numpy_up_loss(task)
    runs = peers.run_peers(
        task, peers=("pydvl",), peer_python=py, num_threads=1, warm_up=False, methods=["DirectInfluence"]
    )  # the same normalisation for all
    assert len(runs) == 1
    for r in runs:
        assert r.error is None, (r.method, r.error, r.details.get("traceback"))
        err = np.abs(r.up_loss - ref).max() / np.abs(ref).max()
        assert err < 1e-6, (r.method, err)


# ------------------------------------------------------------------------------------------------
# kronfluence: the parts that do not need it, then the normalisation where it is installed
# ------------------------------------------------------------------------------------------------
def test_kronfluence_and_arnoldi_method_lists():
    assert peers.PEERS == ("captum", "pydvl", "kronfluence")
    assert set(worker.PEER_PACKAGES) == set(peers.PEERS)
    assert [(lab, cls) for lab, cls, _ in peers.PEER_METHODS["kronfluence"]] == [
        ("EK-FAC", "ekfac"),
        ("K-FAC", "kfac"),
    ]
    assert peers.peer_methods("kronfluence") == ["EK-FAC", "K-FAC"]
    assert "ArnoldiInfluence(rank 50)" in peers.peer_methods("pydvl")
    # selection by label, by class name and by an explicit dict
    assert [r[1] for r in peers._select_methods("kronfluence", ["K-FAC"])] == ["kfac"]
    assert [r[1] for r in peers._select_methods("kronfluence", ["ekfac"])] == ["ekfac"]
    rows = peers._select_methods(
        "kronfluence",
        [{"library": "kronfluence", "method": "kfac", "label": "x", "settings": {"dtype": "float32"}}],
    )
    assert rows == [("x", "kfac", {"dtype": "float32"})]
    assert peers._select_methods("kronfluence", {"pydvl": ["DirectInfluence"]}) == []


def test_kronfluence_module_selection():
    lin = nn.Linear(3, 2)
    model, sel, tracked = worker._kronfluence_model(lin, ["weight", "bias"])
    assert type(model) is nn.Sequential and model[0] is lin  # a bare Linear is wrapped
    assert sel == ["0.weight", "0.bias"] and tracked == ["0"]
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 2)
    )
    names = [n for n, _ in net.named_parameters()]
    assert worker._kronfluence_model(net, [n for n in names if not n.startswith("2.")])[2] == ["0", "3", "5"]
    assert worker._kronfluence_modules(net, ["3.weight", "3.bias"]) == ["3"]
    with pytest.raises(ValueError, match="outside them: 2.weight, 2.bias"):
        worker._kronfluence_modules(net, names)
    with pytest.raises(ValueError, match="partly selected"):
        worker._kronfluence_modules(net, ["3.weight"])


@pytest.mark.parametrize("name", ["cross_entropy", "token_cross_entropy", "logistic", "mse_mean", "mse_sum"])
def test_fisher_sampling_reproduces_the_gauss_newton_output_hessian(name):
    """kronfluence's true Fisher draws targets from the model: the sampled gradients' second moment
    E[∇f ∇fᵀ] (w.r.t. the outputs) must equal the output Hessian of the per-example loss (its
    Gauss-Newton part), here computed by torch.func.hessian of the loss itself. Monte Carlo over N draws:
    a relative error of a few / sqrt(N)."""
    g = torch.Generator().manual_seed(0)
    shape, y = {
        "cross_entropy": ((4,), torch.tensor([2])),
        "token_cross_entropy": ((3, 4), torch.tensor([[1, 0, 3]])),
        "logistic": ((1,), torch.tensor([1.0], dtype=torch.float64)),
        "mse_mean": ((3,), torch.zeros(1, 3, dtype=torch.float64)),
        "mse_sum": ((3,), torch.zeros(1, 3, dtype=torch.float64)),
    }[name]
    out0 = torch.randn(shape, generator=g, dtype=torch.float64)
    loss = worker._per_example_loss({"name": name})
    H = torch.func.hessian(lambda o: loss(o[None], y).sum())(out0).reshape(out0.numel(), out0.numel())
    N = 40_000
    out = out0.expand(N, *shape).clone().requires_grad_(True)
    f = worker._fisher_sample_loss({"name": name})
    f(out, torch.Generator().manual_seed(1)).sum().backward()
    Gs = out.grad.reshape(N, -1)
    M = Gs.T @ Gs / N
    err = float((M - H).abs().max() / H.abs().max())
    assert err < 0.05, (name, err)
    assert worker._fisher_sample_loss({"name": "smooth_hinge", "temperature": 0.1}) is None


def test_token_cross_entropy_payload(tmp_path, monkeypatch):
    """A GPT-style model (integer token inputs, (B, T, V) outputs, a custom class): the payload keeps the
    model's float dtype, names the loss, and the worker rebuilds the model (torch.fx) exactly."""
    from pyinfluence.bench.ladder import TinyGPT, sequence_cross_entropy

    torch.manual_seed(0)
    model = TinyGPT(6, block=5, d_model=8, n_layers=1, n_heads=2).double().eval()
    X = torch.randint(0, 6, (10, 5))
    Y = torch.randint(0, 6, (10, 5))
    names = [n for n, _ in model.named_parameters() if n.startswith("blocks.0.attn.")]
    task = _stand_in_task(model, sequence_cross_entropy, X, Y, X[:2], Y[:2], 0.01, 0.5)
    task.params = names
    fields = peers._write_data(task, str(tmp_path))
    assert fields["dtype"] == "float64" and fields["loss"] == {"name": "token_cross_entropy"}
    assert fields["model"]["format"] == "fx" and fields["params"] == names
    # found by matching values, without the function's peer_loss attribute too
    assert peers._identify_loss(lambda o, y: sequence_cross_entropy(o, y), model, X, Y) == fields["loss"]
    monkeypatch.setenv(worker.MODEL_DIGEST_ENV, fields["model"]["sha256"])
    back = worker._load_model(str(tmp_path), fields["model"], torch.float64)
    torch.testing.assert_close(back(X), model(X), rtol=0, atol=0)
    out = model(X)
    logp = out - torch.logsumexp(out, -1, keepdim=True)
    manual = -logp.gather(-1, Y[..., None])[..., 0].mean(1)
    torch.testing.assert_close(worker._per_example_loss(fields["loss"])(out, Y), manual)


def _numpy_kfac_up_loss(task: Task, ekfac: bool) -> np.ndarray:
    """kronfluence's documented K-FAC / EK-FAC with the empirical Fisher, for a Linear model, in numpy:
    per-example gradients g_i = δ_i ā_iᵀ (δ_i = p_i − e_yi, ā_i = [x_i, 1]), A = mean ā āᵀ, G = mean δ δᵀ,
    Λ = g aᵀ (K-FAC) or mean_i (Q_Gᵀ g_i Q_A)² (EK-FAC), M v = Q_G [(Q_Gᵀ v Q_A) / (Λ + l2 + λ)] Q_Aᵀ;
    up_loss[i, j] = −⟨M g_tj, g_i⟩."""
    W = task.model.weight.detach().numpy()
    b = task.model.bias.detach().numpy()

    def parts(X, y):
        Z = X @ W.T + b
        P = np.exp(Z - Z.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        P[np.arange(len(y)), y] -= 1.0
        return P, np.hstack([X, np.ones((len(X), 1))])

    D, Ab = parts(task.X_train.numpy(), task.y_train.numpy())
    Dt, At = parts(task.X_test.numpy(), task.y_test.numpy())
    n = len(D)
    a, QA = np.linalg.eigh(Ab.T @ Ab / n)
    gv, QG = np.linalg.eigh(D.T @ D / n)
    Gi = D[:, :, None] * Ab[:, None, :]  # (n, K, d+1)
    Gt = Dt[:, :, None] * At[:, None, :]
    if ekfac:
        lam = ((QG.T @ Gi @ QA) ** 2).mean(0)
    else:
        lam = np.outer(gv, a)
    pre = QG @ ((QG.T @ Gt @ QA) / (lam + task.l2 + task.damping)) @ QA.T  # (m, K, d+1)
    return -np.einsum("mkd,nkd->nm", pre, Gi)


def test_kronfluence_normalised_equals_numpy_kfac():
    py = PEER_PYTHON
    reason = peers.available_peers(peer_python=py)["kronfluence"]
    if reason:
        pytest.skip(f"kronfluence not available: {reason[:120]}")
    task = _tiny_task()
    runs = peers.run_peers(
        task,
        peers=("kronfluence",),
        peer_python=py,
        num_threads=1,
        warm_up=False,
        methods=[
            {"library": "kronfluence", "method": s, "label": s, "settings": {"use_empirical_fisher": True}}
            for s in ("ekfac", "kfac")
        ],
    )
    assert [r.method for r in runs] == ["ekfac", "kfac"]
    for r in runs:
        assert r.error is None, (r.method, r.error, r.details.get("traceback"))
        want = _numpy_kfac_up_loss(task, ekfac=r.method == "ekfac")
        np.testing.assert_allclose(r.up_loss, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
        assert r.settings["damping_factor"] == pytest.approx(task.l2 + task.damping)
        assert r.settings["dtype"] == "float64" and r.settings["tracked_modules"] == ["0"]
        assert "-scores.T" in r.details["normalisation"]
