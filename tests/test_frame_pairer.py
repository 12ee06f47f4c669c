"""FramePairer: a point re-taken under a used sequence number (RunEngine rewind) is
reconstructed once; pairs put back for a fuller batch stay eligible."""

from __future__ import annotations

import numpy as np

from bluesky_ptychopinn.callbacks._frames import FramePairer


def _event(seq: int, value: float) -> dict:
    return {"descriptor": "d", "seq_num": seq,
            "data": {"img": np.full((2, 2), value), "y": value, "x": -value}}


def test_a_rewound_point_is_reconstructed_once_and_counted():
    pairer = FramePairer("img", "y", "x", descriptors={"d"})
    for seq in (1, 2, 3):
        pairer.event(_event(seq, seq))
    frames, positions, seqs = pairer.pop_ready()
    assert seqs == [1, 2, 3] and positions[2].tolist() == [3.0, -3.0]
    pairer.event(_event(2, 20.0))  # re-taken after a rewind: same seq_num
    pairer.event(_event(4, 4.0))
    frames, positions, seqs = pairer.pop_ready()
    assert seqs == [4] and pairer.repeated == 1 and pairer.unpaired == 0


def test_pairs_put_back_are_handed_out_again():
    pairer = FramePairer("img", "y", "x", descriptors={"d"})
    pairer.event(_event(1, 1.0))
    frames, positions, seqs = pairer.pop_ready()
    pairer.put_back(frames, positions, seqs)
    again = pairer.pop_ready()
    assert again[2] == [1] and pairer.repeated == 0
    np.testing.assert_array_equal(again[0], frames)
