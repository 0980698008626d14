"""The build's stages, each defined once: its settings and cache key, its per-block function, how
blocks' results combine, and its statistics and summary line. No stage knows which executor runs it.

read -> langid -> tokenize -> dedup -> mix -> pack (-> write)
"""

STAGES = ("read", "langid", "tokenize", "dedup", "mix", "pack")
