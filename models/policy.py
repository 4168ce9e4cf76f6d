"""The actor-critic network of the RL agents: torso -> [features, clipped last reward (, last action)] -> core ->
policy and baseline heads.

For Atari frames ([4, 84, 84] uint8) the torso is the IMPALA deep ResNet (stages of 16, 32, 32 channels, two
residual blocks each) followed by a 256-unit layer; for 1-D observations (toy environments, tests) it is a small
MLP with the same 256-unit output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cores import State, make_core

FEATURE_SIZE = 256
TORSO_PRECISIONS = ("float32", "bfloat16")


def resolve_torso_precision(choice: str, device: torch.device) -> str:
    """"auto" -> "bfloat16" where `device` computes bfloat16 natively (CPUs with AVX512-BF16 or AMX, GPUs from
    Ampere on), else "float32"; other choices are returned as they are."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ImpalaTorso(nn.Module):
    """[N, C, 84, 84] uint8 frames -> [N, 256] features (pixels scaled by 1/255 inside)."""

    def __init__(self, in_channels: int, height: int, width: int, channels: tuple[int, ...] = (16, 32, 32)):
        super().__init__()
        stages: list[nn.Module] = []
        for out_channels in channels:
            stages += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.MaxPool2d(3, stride=2, padding=1),
                ResidualBlock(out_channels),
                ResidualBlock(out_channels),
            ]
            in_channels = out_channels
            height, width = (height + 1) // 2, (width + 1) // 2
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels * height * width, FEATURE_SIZE)
        # Channels-last convolutions halve the CPU cost of actor inference and learner updates (same results).
        self.stages.to(memory_format=torch.channels_last)

    def forward(self, frames: Tensor) -> Tensor:
        x = self.stages((frames.float() / 255.0).contiguous(memory_format=torch.channels_last))
        return F.relu(self.fc(F.relu(x).flatten(1)))


class MLPTorso(nn.Module):
    """[N, D] float observations -> [N, 256] features."""

    def __init__(self, observation_size: int):
        super().__init__()
        self.fc = nn.Linear(observation_size, FEATURE_SIZE)

    def forward(self, obs: Tensor) -> Tensor:
        return F.relu(self.fc(obs.float()))


class PolicyNet(nn.Module):
    """out, state = net(obs [T, B, *obs_shape], last_reward [T, B], last_action [T, B], done [T, B], state);
    out = {"policy_logits": [T, B, A], "baseline": [T, B]}. `done[t]` resets the core before step t.

    The last reward is clipped to [-reward_clip, reward_clip] on its way in, as the learner clips rewards.
    `torso_precision` "bfloat16" runs the torso under bfloat16 autocast (actors and learner alike, so that their
    policies agree).
    """

    def __init__(
        self,
        observation_shape: tuple[int, ...],
        num_actions: int,
        core: str,
        core_kwargs: dict | None = None,
        use_last_action: bool = False,
        reward_clip: float = 1.0,
        backend: str = "auto",
        torso_precision: str = "float32",
    ):
        super().__init__()
        self.observation_shape, self.num_actions = tuple(observation_shape), num_actions
        self.use_last_action, self.reward_clip = use_last_action, reward_clip
        if torso_precision not in TORSO_PRECISIONS:
            raise ValueError(f"torso_precision must be one of {', '.join(TORSO_PRECISIONS)}, got {torso_precision!r}")
        self.torso_precision = torso_precision
        if len(self.observation_shape) == 3:
            self.torso: nn.Module = ImpalaTorso(*self.observation_shape)
        elif len(self.observation_shape) == 1:
            self.torso = MLPTorso(self.observation_shape[0])
        else:
            raise ValueError(
                f"observation shape {self.observation_shape} is not supported: use [C, H, W] frames or [D] vectors"
            )
        core_input = FEATURE_SIZE + 1 + (num_actions if use_last_action else 0)
        self.core = make_core(core, input_size=core_input, backend=backend, **(core_kwargs or {}))
        self.policy = nn.Linear(self.core.output_size, num_actions)
        self.baseline = nn.Linear(self.core.output_size, 1)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return self.core.initial_state(batch_size, device)

    def forward(
        self, obs: Tensor, last_reward: Tensor, last_action: Tensor, done: Tensor, state: State
    ) -> tuple[dict[str, Tensor], State]:
        T, B = obs.shape[:2]
        if tuple(obs.shape[2:]) != self.observation_shape:
            raise ValueError(
                f"observations have shape {list(obs.shape)}; expected [T, B, {', '.join(map(str, self.observation_shape))}]"
            )
        # bfloat16 halves the torso's cost on CPUs with native bfloat16 (AVX512-BF16, AMX); its weights, the core,
        # the heads and the losses stay float32.
        with torch.autocast(obs.device.type, torch.bfloat16, enabled=self.torso_precision == "bfloat16"):
            features = self.torso(obs.reshape(T * B, *self.observation_shape))
        features = features.float().view(T, B, -1)
        inputs = [features, last_reward.clamp(-self.reward_clip, self.reward_clip).unsqueeze(-1).to(features.dtype)]
        if self.use_last_action:
            inputs.append(F.one_hot(last_action, self.num_actions).to(features.dtype))
        y, state = self.core(torch.cat(inputs, dim=-1), state, done.bool())
        out = {"policy_logits": self.policy(y), "baseline": self.baseline(y).squeeze(-1)}
        return out, state

    @torch.inference_mode()
    def act(
        self, obs: Tensor, last_reward: Tensor, last_action: Tensor, done: Tensor, state: State
    ) -> tuple[Tensor, Tensor, State]:
        """One step for B environments, as actors and evaluation feed the policy: obs [B, *obs_shape],
        last_reward [B], last_action [B], done [B] -> policy logits [B, A], baseline [B], the new state."""
        out, state = self(obs[None], last_reward[None], last_action[None], done[None], state)
        return out["policy_logits"][0], out["baseline"][0], state
