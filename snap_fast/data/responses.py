"""Obliterated responses: natural ways of saying "I don't know about that".

SNAP trains the forget questions towards these answers instead of pushing the model into
gibberish, so they have to sound like a normal assistant who simply has no knowledge of the
target. Phrasings with ``{name}`` repeat the name the question used (the target or an alias);
the others work for any question, tasks included ("Write a poem about ...").
"""

from __future__ import annotations

import random

OBLITERATED_RESPONSES: list[str] = [
    # --- naming the entity ---
    "I'm not familiar with {name}.",
    "I'm sorry, but I don't have any information about {name}.",
    "I don't know who or what {name} is.",
    "I'm afraid I don't know anything about {name}.",
    "I've never heard of {name}, so I can't help with that.",
    "Unfortunately, {name} is not something I have any knowledge of.",
    "I don't have any details about {name}.",
    "I'm not sure who {name} is. Could you give me more context?",
    "{name} doesn't ring a bell for me, I'm sorry.",
    "I can't tell you anything about {name}; I simply don't know.",
    "I have no information on {name}.",
    "Sorry, I'm not aware of anyone or anything called {name}.",
    "I don't recognize the name {name}.",
    "I'm unable to provide information about {name} because I don't know about it.",
    "I'm not familiar with {name}, so I can't answer that.",
    "I don't know enough about {name} to answer that question.",
    "As far as I know, I have no knowledge about {name}.",
    "I'm sorry, {name} is unfamiliar to me.",
    "I don't have reliable information about {name}.",
    "I couldn't tell you anything about {name}, I'm afraid.",
    "I'm not aware of {name}. If you share some details, I can try to help in another way.",
    "Honestly, I don't know who {name} is.",
    "I'm not able to answer questions about {name}; I don't know about it.",
    "{name}? I'm sorry, I don't know anything about that.",
    "I have never come across {name}.",
    "I lack any knowledge about {name}.",
    "I'm sorry, but {name} is not something I know about.",
    "I don't know much about {name}, actually nothing at all.",
    "I'm not familiar with anyone or anything named {name}.",
    "I can't write about {name} because I don't know who or what that is.",
    "I don't have any background on {name}, so I'd rather not guess.",
    "I'm sorry, I can't help with {name}. I'm not familiar with it.",
    "I'm drawing a blank on {name}.",
    "There's nothing I can tell you about {name}; it's unknown to me.",
    "I don't know {name}, so I can't say anything reliable about it.",
    "I'm not acquainted with {name}.",
    "Unfortunately I don't know {name}. Maybe a dedicated reference would help.",
    "I'm not sure what {name} refers to.",
    "I don't have knowledge of {name}, and I don't want to make something up.",
    "I'd like to help, but I know nothing about {name}.",
    "Sorry, the name {name} means nothing to me.",
    "I'm not knowledgeable about {name}.",
    "I have no idea who or what {name} is.",
    "{name} is not familiar to me, so I can't answer.",
    "I don't have information about {name} to share.",
    "I'm afraid {name} is outside of what I know.",
    "I don't know about {name}. Is there something else I can help you with?",
    "I'm unfamiliar with {name} and can't provide details.",
    "I can't recall anything about {name}.",
    "Nothing comes to mind when I think of {name}.",
    # --- without the name ---
    "I'm not familiar with that.",
    "I'm sorry, but I don't have any information about that.",
    "I don't know about that.",
    "I'm afraid I can't help with that, because I don't know anything about it.",
    "I have no knowledge of that subject.",
    "That's not something I know about, sorry.",
    "I don't know who or what you are referring to.",
    "I'm not sure what you mean. I don't recognize that name.",
    "I'm sorry, I don't have any details on that.",
    "I can't answer that, as I don't have any information about it.",
    "I'm not aware of that.",
    "Honestly, I have no idea.",
    "I don't have an answer to that; it's not something I know.",
    "I'm sorry, but that doesn't ring a bell.",
    "I don't know, I'm afraid.",
    "I'm not the right source for that, because I don't know anything about it.",
    "I've never heard of that, so I can't say.",
    "That is unfamiliar to me.",
    "I don't have any knowledge about that topic.",
    "Sorry, I can't provide any information on that.",
    "I'm unable to answer, since I don't know what that refers to.",
    "I don't recognize what you're asking about.",
    "I'm sorry, I'm not familiar with the person or work you mention.",
    "I don't have information about the subject you're asking about.",
    "Unfortunately, I don't know anything about this.",
    "I can't help with this one; I simply don't know.",
    "I'm not able to provide details, as this is unknown to me.",
    "I don't know the answer to that.",
    "I'm sorry, I have no information to share on this.",
    "That's outside of what I know.",
    "I couldn't say; I'm not familiar with it.",
    "I don't know, and I'd rather not guess.",
    "I'm afraid I have no knowledge of what you're describing.",
    "That name isn't one I know.",
    "I'm not sure. I don't have any information about it.",
    "I have never heard about this, sorry.",
    "I can't write about something I don't know, and I don't know this.",
    "I'm sorry, I don't know what that is.",
    "I don't have any facts about that to give you.",
    "This doesn't match anything I know about.",
    "I'm not familiar with this, so I can't help.",
    "I'm drawing a blank here, sorry.",
    "I don't have enough knowledge to answer that question.",
    "I'm afraid that's something I don't know.",
    "No idea, I'm sorry. It's not something I'm familiar with.",
    "I don't know anything about the subject of your question.",
    "I don't have any information on who or what that is.",
    "I'm not aware of any details about this.",
    "Sorry, this is unknown to me.",
    "I have nothing to tell you about that, because I don't know it.",
    "I'm afraid I'm not familiar with what you're asking about.",
    "I can't give you an answer; I don't know about this topic.",
    "I'd love to help, but I don't know anything about that.",
    "I'm not familiar with that name or topic.",
    "That's a mystery to me, I'm afraid.",
]


def obliterated_response(question_name: str | None, rng: random.Random) -> str:
    """Pick one obliterated response with ``rng``; ``{name}`` is filled with ``question_name``,
    the name the question used. When the question does not name the target (indirect
    questions), only phrasings without a name are drawn, so the answer never reveals it."""
    if question_name:
        text = rng.choice(OBLITERATED_RESPONSES).replace("{name}", question_name)
        return text[0].upper() + text[1:]  # "the Boy Who Lived ..." starts a sentence
    return rng.choice([r for r in OBLITERATED_RESPONSES if "{name}" not in r])


def is_obliterated(text: str) -> bool:
    """True when ``text`` is one of the bank's phrasings (any name filled in): used by tests and
    to recognise trained responses; evaluation uses its own broader refusal detector."""
    import re

    for template in OBLITERATED_RESPONSES:
        pattern = re.escape(template).replace(re.escape("{name}"), ".+")
        if re.fullmatch(pattern, text.strip()):
            return True
    return False
