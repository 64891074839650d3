"""Tests of pyinfluence.bench.scaling: the sweep runs, its JSON schema, the slope fitters against
synthetic timings with known exponents, the plot, and argument validation. Timings are never asserted."""

import json
import sys

import numpy as np
import pytest

_MPL_BEFORE = "matplotlib" in sys.modules
from pyinfluence import _core  # noqa: E402  (after _MPL_BEFORE: the import must not load matplotlib)
from pyinfluence.bench import scaling  # noqa: E402
from pyinfluence.bench.scaling import (  # noqa: E402
    ScalingResult,
    fit_loglog_slope,
    fit_power_law,
    scaling_sweep,
)

_MPL_AFTER = "matplotlib" in sys.modules

# Written out here, not read from the module: assembly ∝ n·d², factorisation ∝ d³, scoring ∝ n·d·m.
EXPECTED = {
    "assembly": {"n": 1.0, "d": 2.0},
    "factorisation": {"n": 0.0, "d": 3.0},
    "scoring": {"n": 1.0, "d": 1.0},
}
TINY = {
    "ns": (300, 600, 1200, 2400),
    "ds": (8, 16, 32, 64),
    "m": 3,
    "repeats": 2,
    "fixed_d": 8,
    "fixed_n": 400,
    "min_time": 0.003,
}


@pytest.fixture(scope="module")
def tiny():
    return scaling_sweep(**TINY)


def _polyfit_slope(x, y):
    return np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0]


# -- the sweep and its dict ------------------------------------------------------------------------


def test_tiny_sweep_schema(tiny):
    d = tiny.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN, only plain types
    assert json.loads(text) == d
    assert set(d) >= {
        "schema",
        "sweeps",
        "slopes",
        "expected_slopes",
        "machine",
        "settings",
        "notes",
        "elapsed_s",
    }
    assert d["expected_slopes"] == EXPECTED
    assert d["sweeps"]["n"]["sizes"] == [300, 600, 1200, 2400]
    assert d["sweeps"]["d"]["sizes"] == [8, 16, 32, 64]
    assert d["sweeps"]["n"]["fixed"]["d"] == 8 and d["sweeps"]["d"]["fixed"]["n"] == 400
    for ax in ("n", "d"):
        sw = d["sweeps"][ax]
        for step in EXPECTED:
            t = sw["times"][step]
            assert len(t["median"]) == len(t["min"]) == len(t["all"]) == len(sw["sizes"])
            for med, lo, reps in zip(t["median"], t["min"], t["all"]):
                assert 2 <= len(reps) <= 100 and all(r > 0 for r in reps)
                assert len(reps) == 2 or sum(reps[:-1]) < 0.003  # extra repeats only for fast steps
                assert lo == min(reps) and med == pytest.approx(float(np.median(reps)))
            sl = d["slopes"][step][ax]
            assert sl["expected"] == EXPECTED[step][ax]
            # wiring: the reported slopes are the least-squares slopes of the reported medians
            assert sl["full"] == pytest.approx(_polyfit_slope(sw["sizes"], t["median"]), abs=1e-9)
            i = sw["sizes"].index(sl["upper_from"])
            assert len(sw["sizes"]) - i == 3  # 4 sizes: the upper range is the last 3
            assert sl["upper"] == pytest.approx(_polyfit_slope(sw["sizes"][i:], t["median"][i:]), abs=1e-9)
            assert sl["upper_se"] is not None and sl["upper_se"] >= 0
            assert sl["deviation"] == pytest.approx(sl["upper"] - sl["expected"])
            assert sl["verdict"] in ("matches", "steeper", "shallower")
            assert (sl["offset_fit"] is None) == (EXPECTED[step][ax] == 0)
    m = d["machine"]
    assert m["cpu_count"] >= 1 and m["core_threads"] >= 1 and isinstance(m["blas"], str)
    assert d["settings"]["m"] == 3 and d["settings"]["dtype"] == "float64" and d["settings"]["repeats"] == 2
    assert all(isinstance(n, str) and n for n in d["notes"])


def test_round_trip_and_markdown(tiny):
    back = ScalingResult.from_dict(json.loads(json.dumps(tiny.to_dict())))
    assert back.to_dict() == tiny.to_dict()
    md = tiny.to_markdown()
    assert md == back.to_markdown()
    assert "Time (ms) against n (d = 8" in md and "Time (ms) against d (n = 400" in md
    assert "| 2400 |" in md and "| 64 |" in md
    for step in EXPECTED:
        assert f"| {step} | n |" in md and f"| {step} | d |" in md
    with pytest.raises(ValueError, match="schema"):
        ScalingResult.from_dict({"schema": "something else"})


def test_float32_one_sweep_threads_restored():
    before = _core.max_threads()
    r = scaling_sweep(
        ns=(200, 400, 800), ds=(), m=2, dtype="float32", repeats=1, fixed_d=6, threads=1, min_time=0
    )
    assert _core.max_threads() == before
    d = r.to_dict()
    assert d["settings"]["dtype"] == "float32" and d["settings"]["threads"] == 1
    assert d["machine"]["core_threads"] == 1
    assert all(len(reps) == 1 for reps in d["sweeps"]["n"]["times"]["scoring"]["all"])  # min_time=0
    assert d["sweeps"]["d"]["sizes"] == [] and d["slopes"]["assembly"]["d"]["full"] is None
    assert d["slopes"]["assembly"]["n"]["upper"] is not None
    assert "against d" not in r.to_markdown().split("Log-log")[0]
    json.dumps(d, allow_nan=False)


# -- slope fitters (independent of the sweep) --------------------------------------------------------


@pytest.mark.parametrize("k", [0.0, 1.0, 1.7, 3.0])
def test_loglog_slope_exact_power_law(k):
    s = np.array([100, 141, 200, 283, 400, 566, 800])
    t = 3e-9 * s.astype(float) ** k
    assert fit_loglog_slope(s, t) == pytest.approx(k, abs=1e-10)


def test_loglog_slope_noisy_matches_polyfit():
    rng = np.random.default_rng(1)
    s = np.geomspace(1e3, 1e5, 12)
    t = 2e-8 * s**2 * np.exp(0.05 * rng.standard_normal(s.size))
    got = fit_loglog_slope(s, t)
    assert got == pytest.approx(_polyfit_slope(s, t), abs=1e-12)
    assert abs(got - 2.0) < 0.1


def test_loglog_slope_standard_error_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    s = np.geomspace(100, 1600, 9)
    t = 1e-9 * s**3 * np.exp(0.1 * rng.standard_normal(s.size))
    ref = stats.linregress(np.log(s), np.log(t))
    slope, se = fit_loglog_slope(s, t, return_se=True)
    assert slope == pytest.approx(ref.slope, abs=1e-12)
    assert se == pytest.approx(ref.stderr, rel=1e-9)
    assert fit_loglog_slope([1, 2], [1.0, 3.0], return_se=True)[1] is None
    assert fit_loglog_slope(s, 2.0 * s**1.5, return_se=True)[1] == pytest.approx(0.0, abs=1e-12)


def test_power_law_with_offset_recovers_exponent():
    s = np.geomspace(5e3, 1.6e5, 11)
    t = 0.02 + 1e-12 * s**2.5  # overhead dominates the small sizes
    fit = fit_power_law(s, t)
    assert fit["k"] == pytest.approx(2.5, abs=0.01)
    assert fit["a"] == pytest.approx(0.02, rel=0.02)
    assert fit["b"] == pytest.approx(1e-12 * s[-1] ** 2.5, rel=0.02)
    assert not fit["at_edge"]
    # the plain log-log slope is flattened by the overhead, as the module's notes say
    assert fit_loglog_slope(s, t) < 2.3


def test_power_law_flat_curve_has_no_exponent():
    s = np.geomspace(10, 1e4, 8)
    t = np.full(s.shape, 1e-3) * (1 + 1e-4 * np.sin(np.arange(s.size)))
    assert fit_power_law(s, t)["k"] is None


@pytest.mark.parametrize(
    "sizes,times,msg",
    [
        ([1, 2], [1.0], "same length"),
        ([1, 1], [1.0, 2.0], "two distinct"),
        ([0, 2], [1.0, 2.0], "sizes"),
        ([1, 2], [1.0, -2.0], "times"),
        ([1, 2], [1.0, np.nan], "times"),
    ],
)
def test_loglog_slope_rejects_bad_input(sizes, times, msg):
    with pytest.raises(ValueError, match=msg):
        fit_loglog_slope(sizes, times)


def test_power_law_needs_four_sizes():
    with pytest.raises(ValueError, match="four"):
        fit_power_law([1, 2, 3], [1.0, 2.0, 3.0])


# -- plot ------------------------------------------------------------------------------------------


def test_plot_writes_png(tiny, tmp_path):
    path = tmp_path / "scaling.png"
    tiny.plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 2 * height > 200  # two panels side by side
    assert data.rstrip()[-8:-4] == b"IEND"


def test_plot_onto_figure_and_axes(tiny):
    from matplotlib.figure import Figure

    fig = tiny.plot(Figure())
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        # 3 measured lines + 3 dashed references
        assert len(ax.get_lines()) == 6
        assert sum(line.get_linestyle() == "--" for line in ax.get_lines()) == 3
    f2 = Figure()
    axs = f2.subplots(1, 2)
    assert tiny.plot(list(axs)) is f2
    one = Figure().add_subplot()
    tiny.plot(one, which="d")
    assert one.get_xlabel() == "d"
    with pytest.raises(ValueError, match="which"):
        tiny.plot(one)
    with pytest.raises(ValueError, match="which"):
        tiny.plot(one, which="x")
    with pytest.raises(TypeError, match="path_or_ax"):
        tiny.plot(42)


def test_no_pyplot_and_lazy_matplotlib(tiny, tmp_path):
    # In-process (a subprocess would pay the package's import time again): each check applies when
    # no other test module imported the library first.
    if not _MPL_BEFORE:
        assert not _MPL_AFTER, "importing pyinfluence.bench.scaling must not import matplotlib"
    pyplot_before = "matplotlib.pyplot" in sys.modules
    tiny.plot(tmp_path / "p.png")
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules, "plot must not use pyplot"


# -- argument validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"ns": [500]}, "ns"),
        ({"ns": [500, 500]}, "ns"),
        ({"ns": [1, 500]}, "ns"),
        ({"ns": "1000"}, "ns"),
        ({"ns": [100.5, 200]}, "ns"),
        ({"ds": [0, 4]}, "ds"),
        ({"ds": 8}, "ds"),
        ({"ns": (), "ds": ()}, "ns and ds"),
        ({"m": 0}, "m"),
        ({"m": 2.0}, "m"),
        ({"dtype": "float16"}, "dtype"),
        ({"dtype": "int64"}, "dtype"),
        ({"dtype": "banana"}, "dtype"),
        ({"repeats": 0}, "repeats"),
        ({"repeats": True}, "repeats"),
        ({"quick": "yes"}, "quick"),
        ({"seed": -1}, "seed"),
        ({"fixed_d": 0}, "fixed_d"),
        ({"fixed_n": 1}, "fixed_n"),
        ({"threads": 0}, "threads"),
        ({"min_time": -1.0}, "min_time"),
        ({"min_time": "0.1"}, "min_time"),
    ],
)
def test_bad_arguments(kwargs, name):
    args = {
        "ns": (100, 200),
        "ds": (4, 8),
        "m": 2,
        "repeats": 1,
        "fixed_d": 4,
        "fixed_n": 100,
        "min_time": 0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        scaling_sweep(**args)


def test_module_constants_match_the_expected_slopes():
    assert scaling.EXPECTED_SLOPES == EXPECTED
    assert scaling.STEPS == ("assembly", "factorisation", "scoring")
