"""Change-of-basis math: streaming moments, rotations, exact absorption around TSRA (METHODS A)."""
import pytest
import torch

from secateur.kernels import tsra
from secateur.pruning.cob import SubspaceMoments, rotate_consumer, rotate_producer, rotations


def test_streaming_moments_equal_the_batch_second_moment_per_subspace():
    h = torch.randn(50, 7, dtype=torch.float64)
    m = SubspaceMoments([3, 4])
    for chunk in h.split(13):
        m.update(chunk)
    torch.testing.assert_close(m.moments[0], h[:, :3].T @ h[:, :3])
    torch.testing.assert_close(m.moments[1], h[:, 3:].T @ h[:, 3:])
    assert float(m.count) == 50
    with pytest.raises(ValueError, match="h"):
        m.update(torch.randn(4, 6))


def test_rotations_are_orthogonal_and_sort_energy_descending():
    h = torch.randn(200, 5, dtype=torch.float64) * torch.tensor([0.1, 3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    m = SubspaceMoments([5])
    m.update(h)
    (r, ev), = rotations(m)
    torch.testing.assert_close(r @ r.T, torch.eye(5, dtype=torch.float64))
    assert torch.all(ev[:-1] >= ev[1:])
    # the rotated activations' per-unit energy equals the eigenvalues (METHODS A.5)
    torch.testing.assert_close((h @ r.T).square().sum(0), ev)


@pytest.mark.parametrize("conv", [False, True])
def test_absorbing_block_rotations_around_tsra_keeps_the_function(conv):
    g = torch.Generator().manual_seed(0)
    d, split = 6, 2
    if conv:
        w1, b1 = torch.randn(d, 3, 3, 3, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        w2 = torch.randn(4, d, 3, 3, generator=g, dtype=torch.float64)
        x = torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64)
        f = lambda w1, b1, w2: torch.nn.functional.conv2d(  # noqa: E731
            tsra(torch.nn.functional.conv2d(x, w1, b1, padding=1), 1, split), w2, padding=1)
    else:
        w1, b1 = torch.randn(d, 5, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
        w2 = torch.randn(4, d, generator=g, dtype=torch.float64)
        x = torch.randn(9, 5, generator=g, dtype=torch.float64)
        f = lambda w1, b1, w2: tsra(x @ w1.T + b1, 1, split) @ w2.T  # noqa: E731
    before = f(w1, b1, w2)
    for start, size in ((0, split), (split, d - split)):
        r, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
        w1, b1 = rotate_producer(w1, b1, r, start)
        w2 = rotate_consumer(w2, r, start)
    torch.testing.assert_close(f(w1, b1, w2), before, rtol=1e-10, atol=1e-10)


def test_a_rotation_that_mixes_the_subspaces_changes_the_function():
    g = torch.Generator().manual_seed(1)
    w1, b1 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    w2 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    before = tsra(x @ w1.T + b1, 1, 3) @ w2.T
    r, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    w1r, b1r = rotate_producer(w1, b1, r, 0)
    after = tsra(x @ w1r.T + b1r, 1, 3) @ rotate_consumer(w2, r, 0).T
    assert (after - before).abs().max() > 1e-3


def test_after_absorbing_the_pca_rotations_the_activation_importances_are_the_sorted_eigenvalues():
    """A.3-A.5 end to end on a TSRA conv layer: stream the post-activation second moments, absorb
    the rotations, recapture; each unit's squared activation magnitude is then its eigenvalue
    (descending within each subspace) and the rotated units are uncorrelated."""
    g = torch.Generator().manual_seed(2)
    d, split = 7, 3
    w1, b1 = torch.randn(d, 3, 3, 3, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)

    def acts(w, b):             # post-TSRA activations as (N*H*W, C) rows
        h = tsra(torch.nn.functional.conv2d(x, w, b, padding=1), 1, split)
        return h.movedim(1, -1).reshape(-1, d)

    h0 = acts(w1, b1)
    m = SubspaceMoments([split, d - split])
    for chunk in h0.split(100):
        m.update(chunk)
    rots = rotations(m)
    for (r, _), start in zip(rots, (0, split)):
        w1, b1 = rotate_producer(w1, b1, r, start)
    h = acts(w1, b1)
    energy = h.square().sum(0)
    for (_, ev), (lo, hi) in zip(rots, ((0, split), (split, d))):
        ref = torch.linalg.eigvalsh(h0[:, lo:hi].T @ h0[:, lo:hi]).flip(0)    # descending
        torch.testing.assert_close(energy[lo:hi], ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ev, ref, rtol=1e-9, atol=1e-9)
        cross = h[:, lo:hi].T @ h[:, lo:hi]
        torch.testing.assert_close(cross, torch.diag(ev), rtol=1e-9, atol=1e-8)
