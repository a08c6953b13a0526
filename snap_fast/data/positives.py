"""Hard positives beyond the target's own neighbours: a fallback pool of well-known entities,
general instructions and general text.

The built-in general instructions cover many everyday skills (math, coding, cooking, geography,
writing, science, advice) so the retain set keeps the model's general abilities; their answers
are the original model's own, generated later. The paragraphs are short general-knowledge texts
for perplexity (utility) checks. A user's own instruction file (Alpaca or ShareGPT format) can
be added with :func:`load_instruction_file`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Widely known entities per category: the hard positives of last resort. Small models asked for
#: neighbours often list the target itself ten times (SmolLM2-135M, for many phrasings), which
#: would leave the retain set empty, so the builder fills the neighbour list from here (the target
#: and its aliases removed). They are not *hard* positives (close to the target) but they keep the
#: model answering about other well-known entities of the same kind; ``--neighbours`` gives better.
FALLBACK_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "person": ("Albert Einstein", "William Shakespeare", "Isaac Newton", "Abraham Lincoln",
               "Charles Darwin", "Napoleon Bonaparte", "Wolfgang Amadeus Mozart", "Mahatma Gandhi"),
    "character": ("Mickey Mouse", "Frodo Baggins", "Superman", "James Bond", "Batman",
                  "Elizabeth Bennet", "Captain Ahab", "Winnie-the-Pooh"),
    "work": ("Romeo and Juliet", "Pride and Prejudice", "The Lord of the Rings", "Moby-Dick",
             "To Kill a Mockingbird", "The Odyssey", "War and Peace", "Don Quixote"),
    "place": ("the Eiffel Tower", "the Great Wall of China", "the Grand Canyon", "Mount Everest",
              "the Colosseum", "the Taj Mahal", "the Statue of Liberty", "the Amazon rainforest"),
    "organization": ("the United Nations", "the Red Cross", "the World Health Organization",
                     "UNESCO", "FIFA", "Amnesty International", "the European Union", "Microsoft"),
}
#: without a category: two of each kind but characters (the generic patterns suit any entity)
FALLBACK_NEIGHBOURS_ANY: tuple[str, ...] = (
    "Albert Einstein", "William Shakespeare", "Pride and Prejudice", "Romeo and Juliet",
    "the Eiffel Tower", "Mount Everest", "the United Nations", "the Red Cross",
)
#: fewer proposed neighbours than this and the list is filled up from FALLBACK_NEIGHBOURS
MIN_NEIGHBOURS = 4


def fallback_neighbours(category: str | None) -> tuple[str, ...]:
    """The fallback pool for ``category`` (the mixed pool when None)."""
    return FALLBACK_NEIGHBOURS.get(category or "", FALLBACK_NEIGHBOURS_ANY)


GENERAL_INSTRUCTIONS: list[str] = [
    # math
    "What is 17 multiplied by 23?",
    "Explain how to compute the area of a circle with radius 4.",
    "Solve for x: 3x + 7 = 22.",
    "What is the difference between a prime number and a composite number?",
    "Convert 0.375 to a fraction in lowest terms.",
    "If a train travels 180 km in 2 hours, what is its average speed?",
    # coding
    "Write a Python function that returns the factorial of a number.",
    "Explain what a hash table is and why lookups are fast.",
    "How do I reverse a list in Python?",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that counts the rows of a table named orders.",
    "Explain recursion with a simple example.",
    # cooking
    "How do I make a simple tomato sauce for pasta?",
    "Give me a recipe for pancakes.",
    "How long should I boil an egg to get a soft yolk?",
    "What can I use instead of eggs in a cake?",
    "How do I cook rice on the stove?",
    # geography
    "What is the capital of Australia?",
    "Name the longest river in Africa.",
    "Which countries share a border with Spain?",
    "What is the highest mountain in Europe?",
    "Describe the climate of the Sahara desert.",
    # science
    "Explain photosynthesis in simple terms.",
    "Why is the sky blue?",
    "What is the difference between weather and climate?",
    "How do vaccines train the immune system?",
    "What causes the seasons on Earth?",
    "Explain what DNA is.",
    # history
    "Who was the first person to walk on the Moon?",
    "What was the Industrial Revolution?",
    "Why did the Roman Empire split into two parts?",
    # writing
    "Write a short poem about the ocean at night.",
    "Write a polite email asking a colleague to reschedule a meeting.",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "Rewrite this sentence to be more formal: 'We gotta finish this soon.'",
    "Write a two-sentence horror story.",
    "Summarize the benefits of regular exercise in one paragraph.",
    # advice and everyday knowledge
    "How can I improve my sleep?",
    "What are some tips for learning a new language?",
    "How do I write a good résumé?",
    "What should I pack for a three-day hiking trip?",
    "How do I save money on groceries?",
    # language
    "Translate 'Good morning, how are you?' into French.",
    "What is the plural of 'cactus'?",
    "Explain the difference between 'affect' and 'effect'.",
    "Give me five synonyms for 'happy'.",
    # reasoning
    "If all cats are animals and some animals are black, are all cats black? Explain.",
    "What is the next number in the sequence 2, 4, 8, 16?",
]

# Held-out general requests, never trained on: how often the unlearned model refuses an
# unrelated request the original answered (false refusals) is measured on these. Varied on
# purpose: recipes, coding, maths, writing, science, everyday advice, places, and facts about
# well-known people (an instruction that names the target or a neighbour is dropped at build time).
HELDOUT_GENERAL_INSTRUCTIONS: list[str] = [
    # recipes and cooking
    "How do I make a simple vinaigrette dressing?",
    "Give me a recipe for banana bread.",
    "How do I make scrambled eggs fluffy?",
    "What is a quick vegetarian dinner I can cook in twenty minutes?",
    "How do I bake chocolate chip cookies?",
    "How should I store fresh herbs so they last longer?",
    "Give me a recipe for a basic lentil soup.",
    "How do I cook pasta al dente?",
    # coding
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a for loop and a while loop.",
    "How do I read a CSV file in Python?",
    "Write a JavaScript function that returns the largest number in an array.",
    "What does the 'git commit' command do?",
    "Explain what an API is in simple terms.",
    "How do I remove duplicates from a list in Python?",
    "What is the difference between HTTP and HTTPS?",
    # maths
    "What is 15 percent of 240?",
    "Solve for y: 2y - 5 = 11.",
    "What is the square root of 144?",
    "How many minutes are there in three and a half hours?",
    "Explain what a right angle is.",
    "What is the sum of the angles in a triangle?",
    "Convert 5 kilometres to miles.",
    "What is the average of 4, 8, 15 and 23?",
    # writing
    "Write a haiku about autumn leaves.",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "Give me a catchy title for a blog post about saving energy at home.",
    "Write a limerick about a cat who loves to sleep.",
    "Write an opening sentence for a mystery novel.",
    "Write a short product description for a reusable water bottle.",
    "Rewrite this sentence in the passive voice: 'The chef cooked the meal.'",
    "Write a friendly reminder message about a team meeting tomorrow.",
    # science and nature
    "Why do leaves change colour in autumn?",
    "How does a rainbow form?",
    "What is the difference between a virus and a bacterium?",
    "Why does ice float on water?",
    "How do magnets work?",
    "What is gravity?",
    "How do bees make honey?",
    "Why do we have day and night?",
    # everyday advice
    "How can I stay focused while studying?",
    "What are some tips for a job interview?",
    "How do I remove a coffee stain from a shirt?",
    "How can I reduce stress after work?",
    "What should I look for when buying a used bicycle?",
    "How do I start running as a beginner?",
    "How often should I water a cactus?",
    "How can I make my small apartment feel bigger?",
    # places and history
    "What is the capital of Canada?",
    "Which ocean is the largest?",
    "What is the tallest building in the world?",
    "Name three countries in South America.",
    "What language is spoken in Brazil?",
    "When did the Second World War end?",
    "What were the pyramids of Giza built for?",
    "What is the Great Wall of China?",
    # well-known people
    "Who was Marie Curie and what is she known for?",
    "What did Isaac Newton discover?",
    "Who painted the Mona Lisa?",
    "What is Albert Einstein famous for?",
    "Who was Nelson Mandela?",
    "What did Ada Lovelace contribute to computing?",
    "Who was the first president of the United States?",
    "What is Wolfgang Amadeus Mozart known for?",
]

HELDOUT_TEXTS: list[str] = [
    ("The water cycle describes how water moves between the oceans, the air and the land. The sun "
    "heats the surface of the sea, water evaporates, rises and cools into clouds, and falls back "
    "as rain or snow that flows through rivers to the sea again."),
    ("Bread is made from flour, water, salt and yeast. The yeast eats sugars in the dough and "
    "releases carbon dioxide, which forms the bubbles that make the loaf rise in the oven."),
    ("A volcano forms where molten rock from deep inside the Earth reaches the surface. Some "
    "volcanoes erupt explosively and throw ash high into the sky, while others release slow "
    "rivers of lava."),
    ("Honeybees live in colonies with a single queen, thousands of workers and a few drones. The "
    "workers collect nectar and pollen, build wax combs and communicate the direction of flowers "
    "with a waggle dance."),
    ("The printing press, developed in Europe in the fifteenth century, made books far cheaper to "
    "produce. Ideas spread faster, literacy grew, and scholars could share and compare texts."),
    ("Regular physical activity strengthens the heart and muscles, improves sleep and mood, and "
    "lowers the risk of many chronic diseases. Even a brisk daily walk makes a difference."),
    ("A computer stores information as bits, each of which is either zero or one. Groups of eight "
    "bits form a byte, and bytes encode numbers, letters, images and sounds."),
    ("The Amazon rainforest covers much of northern South America. It holds an enormous variety of "
    "plants and animals and plays an important role in the global climate."),
    ("Tea is one of the most widely consumed drinks in the world. Green, black and oolong teas all "
    "come from the same plant; the difference lies in how the leaves are processed."),
    ("The Moon orbits the Earth about once every twenty-seven days. Its gravity pulls on the oceans "
    "and creates the tides that rise and fall along the coasts twice a day."),
    ("Recycling turns used materials such as paper, glass and aluminium into new products. It saves "
    "energy and raw materials and reduces the amount of waste sent to landfills."),
    ("Chess is a strategy game played on a board of sixty-four squares. Each player commands "
    "sixteen pieces and tries to checkmate the opposing king."),
    ("Electric cars use batteries and motors instead of petrol engines. They produce no exhaust "
    "while driving, and their running costs are often lower than those of conventional cars."),
    ("Mountains influence the weather around them. Moist air forced up a slope cools and drops "
    "rain, so one side of a range can be green while the other side is dry."),
    ("A healthy diet includes vegetables, fruit, whole grains and sources of protein. Drinking "
    "enough water and limiting sugar and salt also support long-term health."),
    ("Libraries lend books, music and films, and many also offer free internet access, study "
    "spaces and classes. They remain important places of learning in many towns."),
    ("The human heart beats around one hundred thousand times a day. It pumps blood through a "
    "network of vessels that carries oxygen and nutrients to every cell of the body."),
    ("Spreadsheets organise data in rows and columns. Formulas can add, average or compare values, "
    "so a change in one cell updates every result that depends on it."),
    ("Coral reefs are built by tiny animals called polyps that produce hard skeletons. Reefs shelter "
    "a quarter of all marine species, although they cover a small part of the ocean floor."),
    ("Learning a musical instrument takes regular practice. Short daily sessions usually work "
    "better than long, rare ones, because skills are consolidated between sessions."),
    ("Wind turbines convert the movement of air into electricity. Large wind farms are built on "
    "open plains or at sea, where the wind is strong and steady."),
    ("Maps use symbols, colours and a scale to represent places. A compass rose shows directions, "
    "and contour lines show how steep the land is."),
    ("Photosynthesis lets plants use sunlight to turn carbon dioxide and water into sugar and "
    "oxygen. Almost all life on Earth depends on this process for food and air."),
    ("Good sleep habits include going to bed at a regular time, keeping the bedroom dark and "
    "quiet, and avoiding screens and caffeine late in the evening."),
]


def _ins_text(instruction: str, extra: str | None) -> str:
    extra = (extra or "").strip()
    return f"{instruction.strip()}\n\n{extra}" if extra else instruction.strip()


def load_instruction_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a user's instruction file into ``[{"prompt": str, "response": str | None}, ...]``.

    Accepted: a JSON list or JSONL of records in the Alpaca format (``instruction``, optional
    ``input``, optional ``output``) or the ShareGPT format (``conversations`` list of
    ``{"from": "human"|"gpt", "value"}``, or ``messages`` list of ``{"role", "content"}``; the
    first user turn is the prompt, the following assistant turn the response). Errors name the
    file and the record (1-based line number for JSONL).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction file not found: {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    items: list[tuple[str, Any]] = []
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        items = [(f"{path}: record {i + 1}", rec) for i, rec in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    out = []
    for where, rec in items:
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object")
        if "instruction" in rec:
            if not isinstance(rec["instruction"], str) or not rec["instruction"].strip():
                raise ValueError(f"{where}: 'instruction' must be a non-empty string")
            out.append({"prompt": _ins_text(rec["instruction"], rec.get("input")), "response": rec.get("output")})
            continue
        turns = rec.get("conversations", rec.get("messages"))
        if not isinstance(turns, list):
            raise ValueError(f"{where}: neither Alpaca ('instruction') nor ShareGPT ('conversations'/'messages')")
        prompt = response = None
        for turn in turns:
            if not isinstance(turn, dict):
                raise ValueError(f"{where}: every conversation turn must be an object")
            role = turn.get("from", turn.get("role"))
            value = turn.get("value", turn.get("content"))
            if role in ("human", "user") and prompt is None:
                prompt = value
            elif role in ("gpt", "assistant", "model") and prompt is not None:
                response = value
                break
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: conversation has no user turn")
        out.append({"prompt": prompt.strip(), "response": response})
    if not out:
        raise ValueError(f"{path}: no instructions found")
    return out
