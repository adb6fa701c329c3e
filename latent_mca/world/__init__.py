"""The embedded synthetic multimodal role-play world: shapes, characters, shards and a rule-based judge.

``generate_world(out, WorldSpec(), seed)`` writes paired, text-only and dialogue shards plus the tokenizer
corpus; ``corpus_texts(seed, spec)`` gives that corpus without writing anything; :mod:`.judge` scores
replies on MMRole-like aspects. ``python -m latent_mca synth --out DIR`` is the command-line form.
"""

from latent_mca.world.generator import corpus_texts, generate_world
from latent_mca.world.judge import ASPECTS, judge_pair, score_reply
from latent_mca.world.spec import WorldSpec

__all__ = ["ASPECTS", "WorldSpec", "corpus_texts", "generate_world", "judge_pair", "score_reply"]
