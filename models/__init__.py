"""Models: the recurrent cores and their registry, the fast-weight update rules (`models.ops`), the RL policy
network and the supervised sequence models."""
from models.cores import CORE_NAMES, Core, check_core_name, make_core
from models.policy import PolicyNet

__all__ = ["CORE_NAMES", "Core", "PolicyNet", "check_core_name", "make_core"]
