"""The rollout loop: one actor steps several environments with a CPU copy of the policy and hands out `Unroll`s
(`actors.unroll` gives their layout and wire format).

`Actor` is a plain class (tests and evaluation use it in-process); `RayActor` is the same class as a Ray actor
that Ray restarts when its process dies, and `ActorPool` keeps a set of them busy across the nodes of a cluster.
"""
from __future__ import annotations

import uuid

import numpy as np
import ray
import torch

from actors.envs import make_vector_env
from actors.interface import Episode
from actors.policy_step import PolicyStepper
from actors.unroll import StackedFrames, Unroll
from models import PolicyNet


class Actor:
    """Steps `num_envs` copies of `game` with a CPU `PolicyNet(**model_spec)` and hands out unrolls.

    Args:
        game: any name `actors.envs.resolve_game` accepts.
        env_options: keyword arguments of `actors.envs.make_vector_env` (protocol switches, threads).
        num_envs: environments stepped together (N).
        model_spec: keyword arguments of `models.PolicyNet`; the learner builds its model from the same dict.
        unroll_length: T; every unroll holds T + 1 steps.
        seed: run seed; with `index` it seeds the environments and the action sampler of this actor.
        index: this actor's slot among the run's actors.
        torch_threads: if given, the number of intra-op threads for this process (1 in Ray actors).
        stack_frames: send stacked frame observations ([S, H, W]) in the `StackedFrames` wire format.
    """

    def __init__(
        self,
        game: str,
        env_options: dict,
        num_envs: int,
        model_spec: dict,
        unroll_length: int,
        seed: int,
        index: int = 0,
        torch_threads: int | None = None,
        stack_frames: bool = True,
    ):
        if torch_threads is not None:
            # Actors share the machine's cores with each other and the learner: one thread each avoids
            # oversubscription (TorchBeast does the same).
            torch.set_num_threads(torch_threads)
        self.index, self.unroll_length = index, unroll_length
        self.incarnation = uuid.uuid4().hex[:8]  # tells the learner when a slot's process was replaced
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        env_seed, sampler_seed = np.random.SeedSequence([seed, index]).generate_state(2)
        self.env = make_vector_env(game, num_envs, seed=int(env_seed % 2**31), **env_options)
        self.stack_frames = stack_frames and len(self.env.observation_shape) == 3
        self.policy = PolicyStepper(PolicyNet(**model_spec).eval(), num_envs)
        self.generator = torch.Generator().manual_seed(int(sampler_seed))
        self.version = -1
        self._last: dict[str, np.ndarray] | None = None  # the latest step, to be repeated as the next step 0

    def _act(self, obs: np.ndarray, reward: np.ndarray, done: np.ndarray, last_action: np.ndarray) -> dict:
        """Feed one step of all environments ([N, ...] arrays) to the policy; sample actions [N]."""
        logits, baseline = self.policy(obs, reward, done, last_action)
        action = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator).squeeze(1)
        return {"obs": obs, "reward": reward, "done": done, "last_action": last_action, "action": action.numpy(),
                "policy_logits": logits.numpy(), "baseline": baseline.numpy()}

    def load_weights(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        """Act with `weights` (a `PolicyNet` state dict) from now on; `version` tags the unrolls they produce."""
        self.policy.net.load_state_dict(weights)
        self.version = version

    def unroll(self, version: int | None = None, weights: dict[str, torch.Tensor] | None = None) -> Unroll:
        """Act for T steps and return the unroll; `version`, `weights`: new policy weights to load first."""
        if weights is not None:
            self.load_weights(version, weights)
        if self.version < 0:
            raise RuntimeError("the actor has no policy weights yet: pass version and weights to unroll()")
        episodes: list[Episode] = []
        frames_before = self.env.frames
        if self._last is None:
            # The first step of a fresh actor: every environment starts an episode (done=True resets the core).
            n = self.env.num_envs
            self._last = self._act(self.env.reset(), np.zeros(n, np.float32), np.ones(n, bool), np.zeros(n, np.int64))
        initial_state = [s.numpy().copy() for s in self.policy.state_before]
        buffers = {key: np.empty((self.unroll_length + 1, *v.shape), v.dtype) for key, v in self._last.items()}
        step = self._last
        for t in range(self.unroll_length + 1):
            if t > 0:
                obs, reward, done, ended = self.env.step(step["action"])
                episodes += ended
                step = self._act(obs, reward, done, step["action"])
            for key, value in step.items():
                buffers[key][t] = value
        self._last = {key: value[-1].copy() for key, value in buffers.items()}
        obs = buffers.pop("obs")
        return Unroll(
            obs=StackedFrames.encode(obs) if self.stack_frames else obs,
            **buffers,
            core_state=initial_state,
            version=self.version,
            actor=self.index,
            incarnation=self.incarnation,
            node=self.node,
            episodes=episodes,
            frames=self.env.frames - frames_before,
        )

    def close(self) -> None:
        self.env.close()


class _RemoteActor(Actor):
    def unroll_from_store(self, version: int, weights: list[ray.ObjectRef]) -> Unroll:
        """`unroll` with weights in the object store. The ref comes wrapped in a list so that Ray does not fetch
        the weights for every call: they are fetched only when `version` is new to this actor."""
        if version != self.version:
            self.load_weights(version, ray.get(weights[0]))
        return self.unroll()


# Ray restarts a dead actor process (its constructor reruns, on any node with room) and retries the call that was
# running on it.
RayActor = ray.remote(max_restarts=-1, max_task_retries=-1)(_RemoteActor)


class ActorPool:
    """`num_actors` Ray actors spread over the cluster's nodes, each with at most `unrolls_in_flight` unroll
    requests outstanding (which bounds the policy lag), and replacements for actors that are gone for good.

    Args:
        num_actors: actor slots.
        actor_kwargs: `Actor` arguments other than seed and index.
        seed: run seed; actor seeds derive from it, the slot, the slot's replacement count and `stream`.
        stream: distinguishes the seeds of successive sessions of one run (e.g. the update count at the start).
        num_cpus: Ray CPUs reserved per actor.
        unrolls_in_flight: requests kept outstanding per actor.
        name: prefix of the actors' Ray names (`<name>/actor<slot>.<replacement>`), so they can be found.
        max_replacements: consecutive replacements of a slot without one delivered unroll before giving up.
        actor_class: the Ray actor class to run: `RayActor`, or one with the same constructor keywords (seed,
            index, torch_threads besides `actor_kwargs`) and `unroll_from_store` (bench/ingest.py's synthetic
            actors).
    """

    def __init__(
        self,
        num_actors: int,
        actor_kwargs: dict,
        seed: int,
        stream: int = 0,
        num_cpus: float = 1.0,
        unrolls_in_flight: int = 1,
        name: str = "rfwp",
        max_replacements: int = 5,
        actor_class: ray.actor.ActorClass = RayActor,
    ):
        self.actor_class = actor_class
        self.actor_kwargs, self.seed, self.stream, self.num_cpus = actor_kwargs, seed, stream, num_cpus
        self.unrolls_in_flight, self.name, self.max_replacements = unrolls_in_flight, name, max_replacements
        self.generations = [0] * num_actors
        self.failures = [0] * num_actors  # replacements since the slot last delivered an unroll
        self.replacements = 0  # actors gone for good and replaced
        self.restarts = 0  # actor processes that Ray restarted (seen as a new incarnation in a slot)
        self.incarnations: list[str | None] = [None] * num_actors
        self.nodes: list[str | None] = [None] * num_actors  # where each slot's latest unroll came from
        self.actors = [self._spawn(index) for index in range(num_actors)]
        self.outstanding = [0] * num_actors
        self.pending: dict[ray.ObjectRef, tuple[int, ray.actor.ActorHandle]] = {}

    def _spawn(self, index: int) -> ray.actor.ActorHandle:
        generation = self.generations[index]
        # Seeds differ per replacement and per session, so that no stream of experience repeats.
        seed = int(np.random.SeedSequence([self.seed, self.stream, generation]).generate_state(1)[0])
        return self.actor_class.options(
            num_cpus=self.num_cpus, name=f"{self.name}/actor{index}.{generation}", scheduling_strategy="SPREAD"
        ).remote(**self.actor_kwargs, seed=seed, index=index, torch_threads=1)

    def _request(self, index: int, version: int, weights: list[ray.ObjectRef]) -> None:
        while self.outstanding[index] < self.unrolls_in_flight:
            ref = self.actors[index].unroll_from_store.remote(version, weights)
            self.pending[ref] = (index, self.actors[index])
            self.outstanding[index] += 1

    def next_unroll(self, version: int, weights: list[ray.ObjectRef], timeout: float | None = None) -> Unroll | None:
        """The next unroll any actor finishes; its actor is asked for another one at once, acting with
        (`version`, `weights` = [object ref of the state dict]). None when nothing came within `timeout` seconds
        or the unroll was lost with its actor: Ray restarts actors whose process dies (also on another node when
        theirs is gone), so a lost actor is one gone for good (e.g. `ray.kill`); it is replaced in its slot."""
        for index in range(len(self.actors)):
            self._request(index, version, weights)
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        if not ready:
            return None
        index, actor = self.pending.pop(ready[0])
        current = actor is self.actors[index]  # requests to a replaced actor no longer count
        self.outstanding[index] -= current
        try:
            unroll = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            if current:
                self.failures[index] += 1
                if self.failures[index] > self.max_replacements:
                    raise RuntimeError(f"actor {index} was lost {self.failures[index]} times in a row") from e
                print(f"Actor {index} was lost ({type(e).__name__}); replacing it", flush=True)
                self.generations[index] += 1
                self.replacements += 1
                self.actors[index] = self._spawn(index)
                self.outstanding[index] = 0
            return None
        self.failures[index] = 0
        if self.incarnations[index] not in (None, unroll.incarnation) and current:
            self.restarts += 1
            print(f"Actor {index} was restarted by Ray (now on node {unroll.node[:8]})", flush=True)
        if current:
            self.incarnations[index], self.nodes[index] = unroll.incarnation, unroll.node
        self._request(index, version, weights)
        return unroll

    def actors_per_node(self) -> dict[str, int]:
        """How many actor slots delivered their latest unroll from each node (node ids)."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            if node is not None:
                counts[node] = counts.get(node, 0) + 1
        return counts

    def close(self) -> None:
        """Stop every actor; unrolls still in flight are dropped."""
        for ref in self.pending:
            ray.cancel(ref)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
