"""Text attacks: TextFooler, HotFlip, DeepWordBug, TextBugger and the random-substitution baseline.

BERT-Attack (Li et al., EMNLP 2020; masked-language-model substitutes) is not included: it needs a pretrained
masked language model, and none is available offline here. A substitution source can be plugged in through the
threat model's word vectors instead.
"""

from bastion.text.attacks.base import (
    TEXT_ATTACKS,
    SampleContext,
    TextAttack,
    TextAttackResult,
    TextAttackSummary,
    attack_texts,
)
from bastion.text.attacks.charedits import DeepWordBug, TextBugger
from bastion.text.attacks.hotflip import HotFlip
from bastion.text.attacks.textfooler import RandomSubstitution, TextFooler

__all__ = [
    "TEXT_ATTACKS",
    "DeepWordBug",
    "HotFlip",
    "RandomSubstitution",
    "SampleContext",
    "TextAttack",
    "TextAttackResult",
    "TextAttackSummary",
    "TextBugger",
    "TextFooler",
    "attack_texts",
]
