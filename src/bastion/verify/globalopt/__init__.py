"""Global optimisation with converging bounds: DeepGO, DeepGame and L0 (Hamming-distance) robustness.

* :mod:`.lipschitz`: sound Lipschitz constants over a box (interval bounds on the gradient, or layer norms) and the
  sampled (non-sound) estimate the reference codes use;
* :mod:`.deepgo`: DeepGO reachability (Ruan, Huang & Kwiatkowska, IJCAI 2018);
* :mod:`.deepgame`: DeepGame (Wu, Wicker, Ruan, Huang & Kwiatkowska, TCS 2020);
* :mod:`.l0`: L0-TRE (Ruan et al., IJCAI 2019), whose upper-bound search is also the attack
  :class:`bastion.attacks.L0TRE`.

(The package is ``globalopt`` because ``global`` is a Python keyword and cannot be imported by name.)
"""

from bastion.verify.globalopt.deepgame import deepgame, deepgame_verify
from bastion.verify.globalopt.deepgo import deepgo_range, deepgo_reach, deepgo_robustness, deepgo_safety, deepgo_verify
from bastion.verify.globalopt.l0 import global_robustness, l0_robustness, l0_verify
from bastion.verify.globalopt.lipschitz import estimate_lipschitz, lipschitz_constant

__all__ = [
    "deepgame",
    "deepgame_verify",
    "deepgo_range",
    "deepgo_reach",
    "deepgo_robustness",
    "deepgo_safety",
    "deepgo_verify",
    "estimate_lipschitz",
    "global_robustness",
    "l0_robustness",
    "l0_verify",
    "lipschitz_constant",
]
