"""Every metric pinned on hand-computed matrices (a 3x3, and a 4x4 with ties and a task never learned)."""
import math

import numpy as np
import pytest
import torch

from ctta import metrics as M

R3 = [[0.8, 0.1, 0.0],
      [0.6, 0.9, 0.2],
      [0.5, 0.7, 0.95]]
SIZES3 = [100, 100, 200]

# Task 0 peaks at rows 1 and 2 (a tie), task 2 is never learned (0 on its own row), task 1 recovers fully.
R4 = [[0.5, 0.2, 0.3, 0.1],
      [0.7, 0.6, 0.3, 0.1],
      [0.7, 0.4, 0.0, 0.1],
      [0.4, 0.6, 0.2, 0.9]]
SIZES4 = [10, 20, 30, 40]


def test_cil_step_accuracy_is_sample_weighted():
    # A0 = .8; A1 = (.6*100 + .9*100)/200; A2 = (.5*100 + .7*100 + .95*200)/400 = 310/400
    np.testing.assert_allclose(M.cil_step_accuracy(R3, SIZES3), [0.8, 0.75, 0.775])
    # R4: A1 = (.7*10 + .6*20)/30 = 19/30; A2 = (7 + 8 + 0)/60; A3 = (4 + 12 + 6 + 36)/100
    np.testing.assert_allclose(M.cil_step_accuracy(R4, SIZES4), [0.5, 19 / 30, 15 / 60, 0.58])


def test_average_and_last():
    steps = M.cil_step_accuracy(R3, SIZES3)
    assert M.average_incremental_accuracy(steps) == pytest.approx((0.8 + 0.75 + 0.775) / 3)
    assert M.last_accuracy(steps) == pytest.approx(0.775)


def test_forgetting_chaudhry():
    # j=0: max(.8, .6) - .5 = .3 ; j=1: .9 - .7 = .2  -> .25
    assert M.forgetting(R3) == pytest.approx(0.25)
    # j=0: max(.5,.7,.7) - .4 = .3 (tie) ; j=1: max(.6,.4) - .6 = 0 ; j=2: 0 - .2 = -.2 (never learned) -> .1/3
    assert M.forgetting(R4) == pytest.approx(0.1 / 3)
    assert M.forgetting([[0.7]]) == 0.0


def test_forgetting_continuum_quirk():
    # continuum: j in range(T-2), l in range(T-2) with l >= j, divided by T-1
    # R3: j=0: max(R[0][0]) - R[2][0] = .3 -> .3/2
    assert M.forgetting(R3, continuum_quirk=True) == pytest.approx(0.15)
    # R4: j=0: max(.5,.7) - .4 = .3 ; j=1: .6 - .6 = 0 -> .3/3
    assert M.forgetting(R4, continuum_quirk=True) == pytest.approx(0.1)


def test_bwt_gem():
    assert M.bwt(R3) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert M.bwt(R4) == pytest.approx(((0.4 - 0.5) + (0.6 - 0.6) + (0.2 - 0.0)) / 3)


def test_bwt_all_pairs():
    # pairs (1,0): -.2 ; (2,0): -.3 ; (2,1): -.2  -> -.7 * 2 / 6
    assert M.bwt_all_pairs(R3) == pytest.approx(-0.7 / 3)
    # R4 pairs: (1,0) .2, (2,0) .2, (2,1) -.2, (3,0) -.1, (3,1) 0, (3,2) .2 -> .3 * 2 / 12
    assert M.bwt_all_pairs(R4) == pytest.approx(0.05)
    # continuum's loop skips (i, i-1): R3 keeps only (2,0): -.3 * 2 / 6
    assert M.bwt_all_pairs(R3, continuum_quirk=True) == pytest.approx(-0.1)


def test_forward_transfer():
    assert M.forward_transfer(R3) == pytest.approx((0.1 + 0.2) / 2)
    assert M.forward_transfer(R4) == pytest.approx((0.2 + 0.3 + 0.1) / 3)


def test_mtil_transfer_average_last():
    assert M.mtil_transfer(R3) == pytest.approx((0.1 + (0.0 + 0.2) / 2) / 2)
    # R4 columns above the diagonal: j=1: .2 ; j=2: (.3+.3)/2 ; j=3: (.1+.1+.1)/3
    assert M.mtil_transfer(R4) == pytest.approx((0.2 + 0.3 + 0.1) / 3)
    assert M.mtil_average(R3) == pytest.approx(4.75 / 9)
    assert M.mtil_last(R4) == pytest.approx((0.4 + 0.6 + 0.2 + 0.9) / 4)


def test_summarize_picks_metrics_by_scope():
    cil = M.summarize(R3, SIZES3, "seen")
    assert cil["last"] == pytest.approx(0.775) and "transfer" not in cil
    mtil = M.summarize(R3, SIZES3, "own")
    assert mtil["last"] == pytest.approx(M.mtil_last(R3)) and mtil["transfer"] == pytest.approx(0.1)


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="square"):
        M.forgetting([[0.1, 0.2]])
    with pytest.raises(ValueError, match="non-finite"):
        M.bwt([[math.nan]])
    with pytest.raises(ValueError, match="size"):
        M.cil_step_accuracy(R3, [1, 2])


def test_ece_on_hand_computed_predictions():
    # 20 bins of width .05. conf .95 (bin 18), .95 (bin 18), .42 (bin 8), 1.0 (bin 19)
    conf = torch.tensor([0.95, 0.95, 0.42, 1.0])
    correct = torch.tensor([1, 0, 1, 1])
    # bin 18: |.5 - .95| * 2/4 ; bin 8: |1 - .42| * 1/4 ; bin 19: 0
    expected = 0.45 * 0.5 + 0.58 * 0.25
    assert M.expected_calibration_error(conf, correct) == pytest.approx(expected)
    assert M.expected_calibration_error(torch.ones(3), torch.ones(3)) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        M.expected_calibration_error(torch.tensor([1.5]), torch.tensor([1]))


def test_ece_puts_a_float32_confidence_on_a_bin_edge_in_the_bin_it_closes():
    """float32(0.05) is slightly above 0.05: computed in float64 it fell one bin too high."""
    # one bin (0, .05]: accuracy .5, mean confidence .04 -> .46
    conf = torch.tensor([0.03, 0.05], dtype=torch.float32)
    assert M.expected_calibration_error(conf, torch.tensor([1, 0])) == pytest.approx(0.46, abs=1e-6)
    # a uniform prediction over 10 classes (confidence float32(0.1), right) and a wrong one at .11: two bins,
    # |1 - .1| / 2 + |0 - .11| / 2 = .505
    uniform = torch.softmax(torch.zeros(10), 0)[0]
    conf = torch.stack([uniform, torch.tensor(0.11)])
    assert M.expected_calibration_error(conf, torch.tensor([1, 0])) == pytest.approx(0.505, abs=1e-6)
