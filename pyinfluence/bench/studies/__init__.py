"""Benchmark studies: the measurements behind bench/RESULTS.md and its figures, each runnable as a
module from a source checkout (or anywhere pyinfluence is installed, with scikit-learn and, for the
figures, matplotlib):

- :mod:`~pyinfluence.bench.studies.linear_core`: the exact linear path (C++/Eigen over OpenBLAS)
  against hand-written numpy/scipy (:mod:`~pyinfluence.bench.studies.numpy_baseline`), step by step
  (``python -m pyinfluence.bench.studies.linear_core``);
- :mod:`~pyinfluence.bench.studies.deep_path`: TorchInfluence (Exact, CG, LiSSA) on a digits MLP and
  CNN, HVP overhead, exact matrix against naive torch.func, Koh & Liang's Figure 2 on the CNN
  (``python -m pyinfluence.bench.studies.deep_path``);
- :mod:`~pyinfluence.bench.studies.thread_pools`: small-call latency with several thread pools
  loaded, polite against stock spin settings
  (``python -m pyinfluence.bench.studies.thread_pools``);
- :mod:`~pyinfluence.bench.studies.lissa_checks`: what LiSSA's checks cost, against the LiSSA of an
  earlier commit (``python -m pyinfluence.bench.studies.lissa_checks``);
- :mod:`~pyinfluence.bench.studies.hvp_rate`: Hessian-vector products per mode and blocking across MLP sizes
  (~2k to ~10⁶ parameters) against a plain vmapped forward-over-reverse HVP, and BlockCG against a plain
  batched CG (``python -m pyinfluence.bench.studies.hvp_rate``);
- :mod:`~pyinfluence.bench.studies.gradient_store`: gradient-store build time and the peak memory of streaming
  top-k scoring at n and 10n training examples (``python -m pyinfluence.bench.studies.gradient_store``);
- :mod:`~pyinfluence.bench.studies.scale_ladder`: every solver and the peers (kronfluence, pyDVL) on a ladder
  of models from the exact regime up (``python -m pyinfluence.bench.studies.scale_ladder``);
- :mod:`~pyinfluence.bench.studies.curvature_accuracy`: where K-FAC / EK-FAC lose accuracy (full and per-layer
  Gauss-Newton, Kronecker factors) and what EK-FAC preconditioning saves
  (``python -m pyinfluence.bench.studies.curvature_accuracy``);
- :mod:`~pyinfluence.bench.studies.newton_ladder`: per damping, which leave-one-out Hessians of a deep model
  are indefinite at θ̂ (no Newton step) and the leave-one-out Pearson where the step exists
  (``python -m pyinfluence.bench.studies.newton_ladder``);
- :mod:`~pyinfluence.bench.studies.dask_scale`: the linear path on Dask, N × 100 generated on the workers, at 1
  and 2 workers against the single-process engine (``python -m pyinfluence.bench.studies.dask_scale``).

Each writes its own section of ``--out`` (default: ``bench/RESULTS.md`` of the source checkout, else
``bench/RESULTS.md`` under the current folder) between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` markers, leaving the rest of the file alone; bench/README.md says what every
number means. ``pyinfluence bench`` (:mod:`pyinfluence.bench`) is the installed, user-facing
benchmark; these studies are the one-off measurements reported with the project.
"""
