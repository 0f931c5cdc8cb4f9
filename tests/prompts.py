"""Short, varied raw prompts the engine tests share."""

PROMPTS = [
    "The capital of Italy is",
    "def add(a, b):\n    return",
    "A haiku about rain:",
    "The three laws of motion are",
    "In 1969, astronauts",
    "Water is made of",
    "My favourite fruit is the",
    "The quick brown fox",
    "Once upon a time",
    "Dear diary, today",
    "The best way to learn a language",
    "In the beginning there was",
]
