"""The optional libraries the usefulness suites fit probes with (`pip install saetrain[eval]`).

Imported only when a suite runs, so that training and the default evaluation never need them.
"""

from __future__ import annotations

from types import ModuleType

from saetrain.errors import MissingDependency


def sklearn_modules() -> tuple[ModuleType, ModuleType]:
    """`(sklearn.linear_model, scipy.sparse)`, or a MissingDependency that says what to install."""
    try:  # optional (saetrain[eval]): imported only when a suite runs
        import scipy.sparse
        import sklearn.linear_model
    except ImportError as e:
        raise MissingDependency(
            f"eval.suite needs scikit-learn for its probes ({e}); pip install saetrain[eval]"
        ) from None
    return sklearn.linear_model, scipy.sparse


def one_blas_thread():
    """A context in which BLAS uses one thread: the probes' many small fits run several times
    faster so than with threads that spin (measured: 8 s against 60 s on a busy 2-core CPU)."""
    from threadpoolctl import threadpool_limits  # optional: a scikit-learn dependency

    return threadpool_limits(limits=1, user_api="blas")


def l1_logistic_regression(linear_model: ModuleType, c: float) -> object:
    """An L1 logistic regression (liblinear, balanced classes) in the spelling of the installed
    scikit-learn: 1.8 deprecated `penalty` for `l1_ratio`."""
    import sklearn  # optional (saetrain[eval]), as in sklearn_modules

    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return linear_model.LogisticRegression(
            l1_ratio=1.0, solver="liblinear", C=c, class_weight="balanced"
        )
    return linear_model.LogisticRegression(
        penalty="l1", solver="liblinear", C=c, class_weight="balanced"
    )
