"""The checkpoint keeper: a trainer that dies without a word still leaves its last handed-over state."""
from __future__ import annotations

import torch

from runio.checkpoint import checkpoint_bytes, load_checkpoint
from runio.keeper import _HEADER, CheckpointKeeper


def test_keeper_writes_the_last_complete_state_when_the_trainer_vanishes(tmp_path):
    path = tmp_path / "checkpoint.pt"
    keeper = CheckpointKeeper(path)
    keeper.keep(checkpoint_bytes({"step": torch.tensor(1)}), frames=10)
    keeper.keep(checkpoint_bytes({"step": torch.tensor(2)}), frames=20)
    # The trainer dies in the middle of handing over a third state: only half of it arrives.
    third = checkpoint_bytes({"step": torch.tensor(3)})
    keeper.process.stdin.write(_HEADER.pack(len(third), 30) + third[: len(third) // 2])
    keeper.process.stdin.close()  # as the kernel closes the pipe of a killed process
    assert keeper.process.wait(timeout=60) == 0
    assert load_checkpoint(path)["step"].item() == 2


def test_keeper_writes_nothing_after_a_clean_end(tmp_path):
    path = tmp_path / "checkpoint.pt"
    keeper = CheckpointKeeper(path)
    keeper.keep(checkpoint_bytes({"step": torch.tensor(1)}), frames=10)
    keeper.close()
    assert keeper.process.returncode == 0 and not path.exists()
