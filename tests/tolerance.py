"""How closely two computations of the same floats must agree in a test, and why.

Another CPU runs other kernels: numpy's OpenBLAS picks Haswell, Zen or SkylakeX code by CPU, ONNX
Runtime's MLAS and torch's oneDNN pick AVX2 or AVX-512 blocks, and each sums in its own order. The
same fit then differs in its last digits (a Fréchet level: 2.6293107852758935 on one machine,
2.629310785275914 on another), and a network's float32 outputs in their last few bits. A test that
compares such numbers states one of the tolerances below; exact equality is kept for what is exact
by construction: pixels, labels, row sets, bytes written, a value copied rather than computed.

A decision taken from floats (an argmax, a threshold) is the same on any CPU only where the value
is further from its boundary than the floats can move: :func:`decided` says where that is, so that
a test compares decisions there and nowhere else.
"""

from __future__ import annotations

import numpy as np
import pytest

# A float64 fit (mean, covariance, eigenvalues) of the same inputs, summed in another order or by
# another BLAS kernel: some units in the last place of float64 (2e-16), amplified by the fit's
# conditioning; 1e-9 leaves six orders of magnitude of room. A fit of float32 network outputs made
# on another CPU differs as its inputs do: compare it with NET_RTOL.
FIT_RTOL = 1e-9
# float32 network outputs (logits, features, distances) on another CPU's kernels, or through another
# batch size: each layer's sums round at 6e-8 relative, and a few layers compound that to about
# 1e-6; 1e-5 leaves a factor of ten. ATOL covers outputs near 0, where relative error means nothing.
NET_RTOL, NET_ATOL = 1e-5, 1e-5
# Calibrated probabilities: a softmax of the logits above, in [0, 1].
PROB_ATOL = 1e-5


def net_close(a, b) -> bool:
    """Whether two float32 network outputs agree as two CPUs' kernels would (``NET_RTOL``, ``NET_ATOL``)."""
    return np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=NET_RTOL, atol=NET_ATOL)


def decided(values, threshold: float, rtol: float = NET_RTOL, atol: float = NET_ATOL) -> np.ndarray:
    """Which ``values`` are further from ``threshold`` than the floats can move: a ``> threshold``
    decision about these is the same on any CPU; about the others it may go either way."""
    values = np.asarray(values, np.float64)
    return np.abs(values - threshold) > atol + rtol * np.abs(threshold)


def clear_top1(scores, tolerance: float = PROB_ATOL) -> np.ndarray:
    """Which rows of ``scores`` [N, classes] have a top class ahead of the next by more than two
    ``tolerance``: there, two computations within ``tolerance`` of each other pick the same class."""
    top2 = np.sort(np.asarray(scores, np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > 2 * tolerance


def ranks_clear(scores) -> np.ndarray:
    """For ``scores`` in rank order (highest first), which ranks hold a class more than two
    ``PROB_ATOL`` from its neighbours' scores: there two computations within ``PROB_ATOL`` of each
    other rank the same class; elsewhere two near-tied classes may swap."""
    gaps = np.abs(np.diff(np.asarray(scores, np.float64))) > 2 * PROB_ATOL
    return np.r_[True, gaps] & np.r_[gaps, True]


def assert_ranked_as(classes: list[bytes], ranking: list[dict]) -> None:
    """``classes``, Triton's classification strings ("score:index:label", best first), rank as
    ``ranking`` does: every class of a /classify answer (``top_k`` of all), by probability. The
    scores agree within ``PROB_ATOL``, and the classes wherever the ranking is not a tie."""
    probability = {entry["index"]: entry["probability"] for entry in ranking}
    clear = ranks_clear([entry["probability"] for entry in ranking])
    for rank, text in enumerate(classes):
        score, index, label = text.decode().split(":", 2)
        assert float(score) == pytest.approx(probability[int(index)], abs=PROB_ATOL), text
        if clear[rank]:
            assert (int(index), label) == (ranking[rank]["index"], ranking[rank]["label"]), text


def unsure_clear(outcomes, calibration) -> np.ndarray:
    """Which rows of ``outcomes`` (model_store.engine.Outcomes) get the same ``unsure`` decision on
    any CPU: the top probability, and the energy or OOD distance the calibration judges by, each
    further from its threshold than float32 outputs can move. bool [N]."""
    confidences = outcomes.probabilities.astype(np.float64).max(axis=1)
    clear = np.ones(len(confidences), bool)
    if calibration.confidence_threshold is not None:
        clear &= decided(confidences, calibration.confidence_threshold, rtol=0, atol=PROB_ATOL)
    if calibration.knn_threshold is not None:
        clear &= decided(outcomes.distances, calibration.knn_threshold)
    else:
        clear &= decided(outcomes.energies, calibration.energy_threshold)
    return clear


def assert_same_answers(got: list[dict], want: list[dict], calibration=None) -> None:
    """/classify answers of two services (e.g. a container and a local server) agree: probabilities
    within ``PROB_ATOL``; labels and the ranking wherever no two probabilities tie; ``unsure``
    wherever the top probability is clear of ``calibration``'s confidence threshold (its OOD
    distance comes out of the same ONNX Runtime build on the same CPU, bit for bit); the rest exact."""
    assert len(got) == len(want)
    for one, other in zip(got, want):
        rest = {"probability", "top_k", "label", "index", "unsure", "unsure_reason"}  # compared below, ties aside
        assert {k: v for k, v in one.items() if k not in rest} == {k: v for k, v in other.items() if k not in rest}
        assert one["probability"] == pytest.approx(other["probability"], abs=PROB_ATOL)
        scores = [entry["probability"] for entry in other["top_k"]]
        assert [e["probability"] for e in one["top_k"]] == pytest.approx(scores, abs=PROB_ATOL)
        clear = ranks_clear(scores)
        assert [e["label"] for e, c in zip(one["top_k"], clear) if c] == [
            e["label"] for e, c in zip(other["top_k"], clear) if c
        ]
        if clear[0]:
            assert (one["label"], one["index"]) == (other["label"], other["index"])
        threshold = calibration.confidence_threshold if calibration else None
        if threshold is None or decided([other["probability"]], threshold, rtol=0, atol=PROB_ATOL)[0]:
            assert (one["unsure"], one["unsure_reason"]) == (other["unsure"], other["unsure_reason"])
