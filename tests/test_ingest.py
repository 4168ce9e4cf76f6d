"""bench/ingest.py's synthetic actors send what Atari actors send (shapes, wire format, frame counts), and
`ActorPool` runs them through its `actor_class` hook."""
from __future__ import annotations

import numpy as np
import torch

from actors.actor import ActorPool
from actors.unroll import StackedFrames
from bench.ingest import SyntheticActor, SyntheticRayActor
from learner.impala import batch_unrolls

T, N = 6, 3
STATE_SHAPES = [(N, 4, 3, 32, 32), (N, 4, 32)]


def test_synthetic_unroll_has_the_atari_layout_and_decodes_to_stacked_frames():
    actor = SyntheticActor(N, T, STATE_SHAPES, seed=3, index=1)
    actor.version = 7  # as after loading weights of version 7
    unroll = actor.unroll()
    unroll.check(T, num_actions=4)
    assert isinstance(unroll.obs, StackedFrames)
    obs = unroll.observations()
    assert obs.shape == (T + 1, N, 4, 84, 84) and obs.dtype == np.uint8
    restart = T // 2
    for t in range(1, T + 1):
        for n in range(N):
            if (t, n) == (restart, 0):  # a new episode: the stack is its first frame four times
                assert (obs[t, n] == obs[t, n, -1]).all()
            else:
                np.testing.assert_array_equal(obs[t, n, :-1], obs[t - 1, n, 1:])
    assert unroll.done.sum() == 1 and unroll.done[restart, 0]
    np.testing.assert_array_equal(unroll.obs.restack_index, [[restart, 0]])
    assert unroll.frames == T * N * 4 and unroll.version == 7 and unroll.actor == 1
    assert [s.shape for s in unroll.core_state] == STATE_SHAPES
    # Wire bytes by hand: first stack, T new frames, one restacked stack and its index, then the step arrays
    # (reward, done, last_action, action, logits [.., 4], baseline) and the core state, all float32 but done/ints.
    steps = (T + 1) * N
    expected = (N * 4 * 84 * 84 + T * N * 84 * 84 + 4 * 84 * 84 + 2 * 8
                + steps * (4 + 1 + 8 + 8 + 4 * 4 + 4) + 4 * (N * 4 * 3 * 32 * 32 + N * 4 * 32))
    assert unroll.nbytes == expected


def test_actor_pool_runs_synthetic_actors_into_a_batch(ray_session):
    pool = ActorPool(2, dict(num_envs=N, unroll_length=T, core_state_shapes=STATE_SHAPES), seed=0,
                     actor_class=SyntheticRayActor, name="test-ingest")
    try:
        weights = [ray_session.put({"w": torch.zeros(3)})]
        unrolls = []
        while len({u.actor for u in unrolls}) < 2:
            unroll = pool.next_unroll(5, weights, timeout=60)
            if unroll is not None:
                unrolls.append(unroll)
    finally:
        pool.close()
    assert all(u.version == 5 for u in unrolls)
    batch, core_state = batch_unrolls(unrolls[-2:])
    assert batch["obs"].shape == (T + 1, 2 * N, 4, 84, 84)
    assert [tuple(s.shape) for s in core_state] == [(2 * N, *shape[1:]) for shape in STATE_SHAPES]
