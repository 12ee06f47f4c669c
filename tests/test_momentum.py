"""Momentum across passes (mPIE, ``PIEOptions.momentum``): the heavy-ball arithmetic against a
hand computation, when ``"auto"`` engages (the probe being learnt, from the data), and its
effect on a blind reconstruction judged against the truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bluesky_ptychopinn import metrics, physics
from bluesky_ptychopinn.errors import InvalidInputError
from bluesky_ptychopinn.recon import (
    PassAcceleration,
    PassMomentum,
    PIEOptions,
    StreamingRefiner,
    pie_reconstruct,
    probe_change,
)
from bluesky_ptychopinn.synthetic import make_object


def test_the_heavy_ball_step_matches_a_hand_computation():
    momentum = PassMomentum(friction=0.7, gain=0.5)
    x0, x1, x2 = (torch.tensor([v], dtype=torch.complex64) for v in (0.0, 1.0, 1.5))
    assert momentum.step(x0) is x0  # the first pass only marks
    out1 = momentum.step(x1)  # v = 1 - 0 = 1; x = 1 + 0.5 * 1
    assert complex(out1) == pytest.approx(1.5)
    out2 = momentum.step(x2)  # v = 0.7 * 1 + (1.5 - 1.5) = 0.7; x = 1.5 + 0.35
    assert complex(out2) == pytest.approx(1.85)


def test_momentum_shortens_a_slow_fixed_point_iteration():
    # x <- x + 0.1 (1 - x) per pass: a slowly contracting map, as rPIE is on a poorly
    # conditioned (blind) problem. Passes until within 1 % of the fixed point:
    def passes(with_momentum: bool) -> int:
        momentum, x = PassMomentum(0.7, 0.5), torch.zeros(1, dtype=torch.complex64)
        momentum.mark(x)
        for k in range(1, 200):
            x = x + 0.1 * (1 - x)
            if with_momentum:
                x = momentum.step(x)
            if abs(complex(x) - 1) < 0.01:
                return k
        return 200

    assert passes(False) == 44  # 0.9^k < 0.01
    assert passes(True) < 0.6 * passes(False)


def test_a_rolled_probe_rolls_its_history():
    rng = np.random.default_rng(0)
    shapes = (2, 8, 8)
    a, b, c = (torch.from_numpy(rng.normal(size=shapes) + 1j * rng.normal(size=shapes))
               .to(torch.complex64) for _ in range(3))
    plain, rolled = PassMomentum(0.7, 0.5), PassMomentum(0.7, 0.5)
    for m in (plain, rolled):
        m.step(a)
    plain.step(b)
    rolled.step(b)
    rolled.roll((2, -1))
    expected = torch.roll(plain.step(c), (2, -1), dims=(-2, -1))
    torch.testing.assert_close(rolled.step(torch.roll(c, (2, -1), dims=(-2, -1))), expected)


def test_probe_change_sees_the_shape_not_the_scale_nor_the_mode_mixing():
    probe = torch.from_numpy(physics.make_probe("mixed", 32, 20e-9, 8_800, n_modes=3))
    assert probe_change(probe, 3.0 * probe) == pytest.approx(0.0, abs=1e-6)
    unitary = torch.linalg.qr(torch.randn(3, 3, dtype=torch.complex64))[0]
    mixed = torch.einsum("ij,jyx->iyx", unitary, probe)
    assert probe_change(probe, mixed) == pytest.approx(0.0, abs=1e-5)
    assert probe_change(probe, torch.roll(probe, 3, dims=-1)) > 0.1


def _pass(acc: PassAcceleration, probe: torch.Tensor, *, settled: bool = False,
          updating: bool = True) -> torch.Tensor:
    obj = torch.ones(4, 4, dtype=torch.complex64)
    return acc.end_pass(obj, probe, probe_updating=updating, settled=settled)


def test_auto_engages_while_the_probe_is_being_learnt_and_not_otherwise():
    disc = torch.zeros(1, 16, 16, dtype=torch.complex64)
    disc[0, 4:12, 4:12] = 1
    wide = torch.zeros_like(disc)
    wide[0, 2:14, 2:14] = 1
    acc = PassAcceleration("auto", 0.7, 0.5)
    _pass(acc, disc)
    assert not acc.engaged  # nothing to compare the first pass with
    _pass(acc, wide)  # the probe changed a lot: it is being learnt
    assert acc.engaged
    _pass(acc, wide * 1.01)  # a pass that hardly changed it: learnt
    assert not acc.engaged
    _pass(acc, disc)
    assert acc.engaged
    _pass(acc, wide, settled=True)  # the error settled: off, whatever the probe does
    assert not acc.engaged

    fixed = PassAcceleration("auto", 0.7, 0.5)  # a probe not refined never engages it
    for probe in (disc, wide, disc):
        assert _pass(fixed, probe, updating=False) is probe
    assert not fixed.engaged and fixed.passes_engaged == 0
    off = PassAcceleration("off", 0.7, 0.5)
    assert all(_pass(off, p) is p for p in (disc, wide, disc)) and off.passes_engaged == 0


@pytest.mark.parametrize("options", [dict(momentum="fast"), dict(momentum_friction=1.0),
                                     dict(momentum_gain=0.0)])
def test_momentum_settings_out_of_range_are_refused(options):
    with pytest.raises(InvalidInputError, match="momentum"):
        PIEOptions(**options).validate()


def _blind_scan(n: int = 64, side: int = 192, sample: str = "test_chip", seed: int = 4):
    """A 3-mode zone-plate beam learnt from a flat 3-mode disc, 1e4 photons per frame."""
    probe = physics.make_probe("mixed", n, 20e-9, 8_800, n_modes=3)
    if probe.shape[0] == 1:
        probe = physics.mixed_state_probe(probe, 3, decay=0.5)
    step = physics.probe_diameter_px(probe) * 0.3
    grid = np.arange(n / 2 + 2, side - n / 2 - 2, step)
    positions = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    truth = make_object(sample, (side, side), seed=seed)
    counts = physics.simulate_diffraction(truth, probe, positions, photons=1e4,
                                          seed=seed).counts.numpy()
    c = np.arange(n) - n // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    disc = (np.hypot(yy, xx) <= physics.probe_diameter_px(probe) / 2).astype(np.complex64)
    start = physics.mixed_state_probe(physics.normalize_probe(disc), 3, decay=0.5)
    return probe, start, truth, positions, counts


def _score(obj: np.ndarray, truth: np.ndarray) -> float:
    margin = (truth.shape[0] - 64) // 2 - 8
    box = (slice(margin, truth.shape[0] - margin),) * 2
    aligned = metrics.compare_objects(obj[box], truth[box], taper_px=6)
    rec, tru = aligned["recon"], aligned["truth"]
    window = metrics.tukey_taper(rec.shape, 6)
    return float(metrics.frc_auc(metrics.frc((rec - rec.mean()) * window,
                                             (tru - tru.mean()) * window), 0.5))


def test_a_blind_refinement_engages_momentum_and_gets_there_sooner():
    torch.set_num_threads(1)
    _, start, truth, positions, counts = _blind_scan()
    curves, engaged = {}, {}
    for mode in ("off", "auto"):
        options = PIEOptions(device="cpu", progress=False, momentum=mode)
        refiner = StreamingRefiner(start, object_shape=truth.shape, options=options,
                                   start="flat")
        refiner.add(counts, positions)
        curves[mode] = []
        for _ in range(20):
            refiner.run(max_epochs=1)
            curves[mode].append(_score(refiner.snapshot().object, truth))
        engaged[mode] = refiner.acceleration.passes_engaged
    assert engaged["off"] == 0 and engaged["auto"] > 0
    level = 0.9 * max(curves["off"])
    reached = {m: next(k for k, s in enumerate(c) if s >= level) for m, c in curves.items()}
    assert reached["auto"] < reached["off"], curves


def test_a_known_probe_never_engages_auto_and_is_left_exactly_as_plain_rpie():
    probe, _, truth, positions, counts = _blind_scan()
    results = {}
    for mode in ("off", "auto"):
        options = PIEOptions(device="cpu", progress=False, momentum=mode, n_epochs=6)
        results[mode] = pie_reconstruct(counts, positions, probe, object_shape=truth.shape,
                                        options=options)
    np.testing.assert_array_equal(results["auto"].object, results["off"].object)
    np.testing.assert_array_equal(results["auto"].probe, results["off"].probe)
    on = pie_reconstruct(counts, positions, probe, object_shape=truth.shape,
                         options=PIEOptions(device="cpu", progress=False, momentum="on",
                                            n_epochs=6))
    assert not np.array_equal(on.object, results["off"].object)  # "on" does move it
