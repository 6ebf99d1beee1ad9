import pytest
import torch

from llm_surgeon.data.windows import calibration_windows, evaluation_windows
from llm_surgeon.errors import UserError


def _is_window_of(ids: torch.Tensor, window: torch.Tensor) -> bool:
    L = window.numel()
    return any(torch.equal(ids[s : s + L], window) for s in range(ids.numel() - L + 1))


def test_calibration_windows_are_seeded_and_reproducible():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 16, 32, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    b = calibration_windows(ids, 16, 32, seed=3)
    c = calibration_windows(ids, 16, 32, seed=4)
    assert a.shape == (16, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_windows_never_out_of_range():
    # Text just one token longer than a window: only two valid offsets exist.
    ids = torch.arange(11) * 7
    w = torch.cat([calibration_windows(ids, 1, 10, seed=s) for s in range(200)])
    starts = {int(row[0]) // 7 for row in w}
    assert starts <= {0, 1} and starts == {0, 1}
    for row in w:
        assert _is_window_of(ids, row)
    # Random text: every window is a contiguous piece of the stream.
    ids = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(1))
    for row in calibration_windows(ids, 17, 17, seed=5):
        assert _is_window_of(ids, row)


def test_evaluation_windows_non_overlapping_and_capped():
    ids = torch.arange(105)
    w = evaluation_windows(ids, 10)
    assert w.shape == (10, 10)
    assert torch.equal(w.flatten(), torch.arange(100))
    assert evaluation_windows(ids, 10, max_windows=3).shape == (3, 10)
    assert evaluation_windows(ids, 10, max_windows=50).shape == (10, 10)


@pytest.mark.parametrize("n", [0, -1])
def test_non_positive_counts_rejected(n):
    with pytest.raises(UserError, match="positive"):
        calibration_windows(torch.arange(100), n, 10)
    with pytest.raises(UserError, match="positive"):
        evaluation_windows(torch.arange(100), 10, max_windows=n)


def test_text_shorter_than_a_window_rejected():
    with pytest.raises(UserError, match="shorter than one"):
        evaluation_windows(torch.arange(5), 10)
    with pytest.raises(UserError, match="shorter than one"):
        calibration_windows(torch.arange(10), 1, 10)


def test_calibration_request_longer_than_the_text_is_refused():
    ids = torch.arange(100)
    calibration_windows(ids, 10, 10)  # exactly the text: fine
    with pytest.raises(UserError, match="fewer than the 11 x 10"):
        calibration_windows(ids, 11, 10)
