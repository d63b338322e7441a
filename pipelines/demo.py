"""A deterministic synthetic multimodal dataset with a known taste structure.

``generate(out_dir, ...)`` writes a dataset in the project's data contract
(see :mod:`pipelines.schema`):

* ``users.csv``   user_id, age, gender, occupation, city
* ``items.csv``   item_id, title, description, genres (``|``), director, cast (``|``),
  year, image, video (paths relative to the dataset directory, empty for the few
  items that deliberately lack a modality)
* ``ratings.csv`` user_id, item_id, rating (int 1-5), timestamp (Unix seconds)
* ``images/<item_id>.png`` and ``videos/<item_id>.mp4``
* ``truth.json``  the latent structure: topics, each item's topic mixture and main
  topic, each user's taste (start and end of their history) and top topics, and the
  attribute -> topic effects used to build the tastes.

The structure is real so that metrics mean something:

* ``K`` latent topics, each with genres, a vocabulary for titles/descriptions/people,
  an image palette and shape style, and a video motion pattern.
* Items have a topic mixture dominated by one main topic and a Zipf popularity.
* A user's taste over topics is a softmax of attribute effects (age group,
  occupation, gender) plus individual noise, so attributes help with cold users;
  it drifts between the start and the end of their history.  Activity is
  heavy-tailed (log-normal number of interactions).
* Users pick items without replacement with probability
  ``popularity**popularity_exponent * exp(beta * taste . item_topics)`` (Gumbel
  top-k), the first half of their history with the start taste and the second
  half with the end taste; the rating is affinity + user/item bias + noise.

Deterministic: every random draw comes from a ``numpy`` Generator seeded from
``seed`` and a fixed stream tag, so the same arguments give byte-identical tables,
images and videos; switching images/videos off does not change the tables.
Ratings are generated in user chunks with vectorised numpy and streamed to the
CSV (or a parquet file with ``fmt='parquet'``), so millions of interactions never
exist as Python rows.

CLI: ``python -m pipelines.demo --out DIR [--users N --items M --seed S
--interactions N --no-images --no-videos --image-size PX --format parquet]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .recommenders.base import topk

# --------------------------------------------------------------------------- topics


@dataclass(frozen=True)
class Topic:
    name: str
    genres: tuple[str, ...]
    heroes: tuple[str, ...]  # people nouns
    nouns: tuple[str, ...]  # things
    places: tuple[str, ...]
    verbs: tuple[str, ...]  # base form
    adjectives: tuple[str, ...]
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # vertical gradient top, bottom
    foreground: tuple[tuple[int, int, int], ...]
    style: str  # shape style of the image
    motion: str  # motion pattern of the video
    year: tuple[int, int]  # mean, sd of the release year

    @property
    def words(self) -> tuple[str, ...]:
        return self.heroes + self.nouns + self.places + self.verbs + self.adjectives


TOPICS: tuple[Topic, ...] = (
    Topic("space-sci-fi", ("Sci-Fi", "Adventure", "Action"),
          ("astronaut", "pilot", "alien", "cosmonaut", "android", "captain"),
          ("starship", "planet", "galaxy", "rocket", "nebula", "comet", "orbit", "asteroid"),
          ("space station", "moon base", "distant planet", "asteroid belt", "mothership"),
          ("explore", "launch", "colonise", "orbit", "terraform"),
          ("cosmic", "interstellar", "orbital", "stellar", "galactic"),
          ((8, 10, 40), (40, 20, 90)), ((250, 250, 255), (120, 220, 255), (255, 170, 60)),
          "stars", "pan", (2005, 12)),
    Topic("romance", ("Romance", "Drama", "Comedy"),
          ("bride", "sweetheart", "lover", "fiance", "widow", "suitor"),
          ("love", "wedding", "heart", "kiss", "letter", "promise", "bouquet", "ring"),
          ("Paris cafe", "seaside town", "ballroom", "rose garden", "vineyard"),
          ("marry", "woo", "court", "embrace", "cherish"),
          ("tender", "passionate", "romantic", "sweet", "heartfelt"),
          ((255, 200, 215), (240, 120, 160)), ((220, 20, 60), (255, 255, 255), (180, 0, 90)),
          "hearts", "pulse", (1998, 15)),
    Topic("crime-thriller", ("Crime", "Thriller", "Mystery"),
          ("detective", "gangster", "informant", "witness", "mobster", "inspector"),
          ("heist", "murder", "evidence", "alibi", "cartel", "ransom", "conspiracy", "bullet"),
          ("precinct", "back alley", "casino", "underworld", "interrogation room"),
          ("investigate", "smuggle", "interrogate", "betray", "frame"),
          ("ruthless", "corrupt", "undercover", "deadly", "criminal"),
          ((30, 30, 35), (70, 70, 75)), ((250, 210, 0), (200, 20, 20), (230, 230, 230)),
          "stripes", "shake", (1995, 14)),
    Topic("animation-family", ("Animation", "Children's", "Comedy", "Fantasy"),
          ("puppy", "princess", "toy", "kitten", "little dragon", "snowman"),
          ("friendship", "magic", "cartoon", "balloon", "treasure map", "rainbow", "lullaby",
           "cupcake"),
          ("enchanted forest", "toy box", "candy kingdom", "playground", "fairy village"),
          ("giggle", "befriend", "play", "sing along", "sparkle"),
          ("magical", "cuddly", "brave", "funny", "colourful"),
          ((255, 240, 120), (255, 200, 60)), ((0, 160, 255), (255, 60, 160), (60, 200, 60)),
          "circles", "bounce", (2008, 10)),
    Topic("documentary-nature", ("Documentary",),
          ("biologist", "naturalist", "explorer", "ranger", "researcher", "photographer"),
          ("wildlife", "ocean", "glacier", "species", "ecosystem", "coral reef", "migration",
           "climate"),
          ("rainforest", "savanna", "arctic tundra", "river delta", "mountain range"),
          ("observe", "document", "protect", "track", "film"),
          ("wild", "endangered", "untamed", "natural", "ancient"),
          ((120, 190, 240), (40, 120, 50)), ((20, 90, 30), (240, 240, 240), (90, 60, 30)),
          "mountains", "zoom_in", (2010, 8)),
    Topic("horror", ("Horror", "Thriller"),
          ("ghost", "zombie", "demon", "vampire", "witch", "possessed child"),
          ("curse", "nightmare", "blood", "ritual", "skull", "coffin", "possession", "scream"),
          ("haunted house", "crypt", "abandoned asylum", "graveyard", "dark cellar"),
          ("haunt", "terrify", "devour", "summon", "possess"),
          ("cursed", "sinister", "undead", "eerie", "bloody"),
          ((0, 0, 0), (60, 0, 0)), ((200, 0, 0), (240, 240, 240), (120, 0, 0)),
          "zigzag", "flicker", (2000, 12)),
    Topic("western", ("Western", "Action"),
          ("cowboy", "sheriff", "outlaw", "gunslinger", "rancher", "bandit"),
          ("saloon", "horse", "gold", "revolver", "stagecoach", "bounty", "cattle", "railroad"),
          ("frontier town", "desert canyon", "ranch", "prairie", "mining camp"),
          ("ride", "duel", "rustle", "lasso", "ambush"),
          ("dusty", "lawless", "lone", "rugged", "wild west"),
          ((250, 180, 90), (170, 90, 30)), ((90, 50, 20), (255, 230, 120), (60, 30, 10)),
          "bands", "tilt", (1968, 14)),
    Topic("musical", ("Musical", "Comedy", "Romance"),
          ("singer", "dancer", "composer", "chorus girl", "conductor", "pianist"),
          ("song", "melody", "orchestra", "rhythm", "chorus", "audition", "encore", "duet"),
          ("broadway stage", "concert hall", "dance studio", "jazz club", "opera house"),
          ("sing", "dance", "perform", "rehearse", "compose"),
          ("dazzling", "joyful", "rhythmic", "melodic", "glamorous"),
          ((90, 20, 120), (160, 60, 200)), ((255, 210, 40), (255, 255, 255), (255, 120, 220)),
          "bars", "colour_shift", (1985, 18)),
    Topic("war-history", ("War", "Drama"),
          ("soldier", "general", "sergeant", "medic", "emperor", "resistance fighter"),
          ("battle", "empire", "trench", "regiment", "siege", "invasion", "medal", "armistice"),
          ("battlefield", "fortress", "occupied city", "beachhead", "royal court"),
          ("conquer", "defend", "liberate", "invade", "surrender"),
          ("heroic", "bloody", "historic", "wartime", "imperial"),
          ((140, 140, 90), (90, 90, 50)), ((60, 60, 30), (200, 190, 150), (150, 40, 30)),
          "grid", "zoom_out", (1975, 16)),
    Topic("sports-drama", ("Drama", "Comedy", "Sport"),
          ("athlete", "coach", "boxer", "rookie", "quarterback", "sprinter"),
          ("championship", "trophy", "team", "marathon", "season", "scoreboard", "comeback",
           "final"),
          ("stadium", "boxing ring", "locker room", "race track", "basketball court"),
          ("train", "compete", "win", "score", "sprint"),
          ("underdog", "competitive", "athletic", "victorious", "determined"),
          ((240, 240, 240), (180, 200, 220)), ((0, 80, 200), (230, 60, 20), (20, 20, 20)),
          "rings", "rotate", (2003, 11)),
)

MAX_TOPICS = len(TOPICS)

AGE_GROUPS = ("under-18", "18-24", "25-34", "35-49", "50+")
AGE_EDGES = (18, 25, 35, 50)  # np.searchsorted(AGE_EDGES, age, side='right') -> group index
# age group -> topic -> effect on the taste logit (topics absent: 0)
AGE_EFFECTS: dict[str, dict[str, float]] = {
    "under-18": {"animation-family": 2.0, "horror": 0.8, "space-sci-fi": 0.8, "sports-drama": 0.6,
                 "documentary-nature": -1.0, "western": -1.5, "war-history": -1.2, "musical": -0.5},
    "18-24": {"horror": 1.4, "space-sci-fi": 0.9, "crime-thriller": 0.6, "romance": 0.4,
              "western": -1.2, "documentary-nature": -0.6, "war-history": -0.6},
    "25-34": {"crime-thriller": 1.0, "space-sci-fi": 0.6, "romance": 0.6, "sports-drama": 0.4,
              "western": -0.7},
    "35-49": {"crime-thriller": 0.7, "documentary-nature": 0.8, "war-history": 0.5,
              "animation-family": -0.6, "horror": -0.6},
    "50+": {"western": 1.8, "documentary-nature": 1.3, "war-history": 1.3, "musical": 1.0,
            "horror": -1.6, "animation-family": -1.2, "space-sci-fi": -0.6},
}
OCCUPATIONS = ("student", "engineer", "scientist", "artist", "educator", "healthcare",
               "writer", "executive", "technician", "homemaker", "retired", "other")
OCCUPATION_EFFECTS: dict[str, dict[str, float]] = {
    "student": {"animation-family": 0.5, "horror": 0.5},
    "engineer": {"space-sci-fi": 1.4, "war-history": 0.4},
    "scientist": {"space-sci-fi": 1.2, "documentary-nature": 1.2},
    "artist": {"musical": 1.5, "romance": 0.6},
    "educator": {"documentary-nature": 1.0, "war-history": 0.6},
    "healthcare": {"romance": 0.7, "crime-thriller": 0.5},
    "writer": {"crime-thriller": 1.2, "romance": 0.6, "musical": 0.4},
    "executive": {"sports-drama": 1.2, "crime-thriller": 0.6},
    "technician": {"space-sci-fi": 0.7, "western": 0.5},
    "homemaker": {"animation-family": 1.2, "romance": 0.8},
    "retired": {"western": 1.0, "war-history": 0.6},
    "other": {},
}
GENDERS = ("F", "M")
CITIES = ("Amsterdam", "Berlin", "Chicago", "Lagos", "Lisbon", "London", "Mumbai", "Osaka",
          "Paris", "Sao Paulo", "Seoul", "Sydney", "Toronto", "Warsaw")
FIRST_NAMES = ("Ada", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
               "Kemi", "Liam", "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tara",
               "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zoe")
LAST_NAMES = ("Abbott", "Bauer", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Hughes",
              "Ivanova", "Jensen", "Kowalski", "Larsen", "Moreau", "Nakamura", "Okafor", "Petrov",
              "Quist", "Rossi", "Silva", "Tanaka", "Ueda", "Varga", "Weber", "Yilmaz", "Zhang")

T0 = 1_420_070_400  # 2015-01-01T00:00:00Z: start of the rating period
HISTORY_WINDOW_S = 3 * 365 * 86_400  # users start within three years of T0

# stream tags: one independent generator per component
_S_USERS, _S_ITEMS, _S_RATINGS, _S_IMAGES, _S_VIDEOS = 1, 2, 3, 4, 5


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(t) for t in tags]])


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def effect_tables(topics: tuple[Topic, ...], seed: int) -> dict[str, np.ndarray]:
    """Attribute -> topic logit effects (rows follow AGE_GROUPS / OCCUPATIONS / GENDERS)."""
    names = [t.name for t in topics]
    age = np.array([[AGE_EFFECTS[g].get(n, 0.0) for n in names] for g in AGE_GROUPS])
    occ = np.array([[OCCUPATION_EFFECTS[o].get(n, 0.0) for n in names] for o in OCCUPATIONS])
    g = _rng(seed, _S_USERS, 99).normal(0.0, 0.35, len(names))
    gender = np.stack([g, -g])  # a small, seeded, symmetric effect
    return {"age_group": age, "occupation": occ, "gender": gender}


# --------------------------------------------------------------------------- users


def make_users(n_users: int, topics: tuple[Topic, ...], seed: int, taste_noise: float = 0.8,
               drift: float = 0.6, temperature: float = 1.0) -> tuple[pd.DataFrame, dict]:
    """User attributes + latent tastes (start/end of history) correlated with attributes."""
    rng = _rng(seed, _S_USERS)
    k = len(topics)
    # age: a mixture of teenagers, young adults and older people
    comp = rng.choice(3, size=n_users, p=[0.15, 0.55, 0.30])
    age = np.where(comp == 0, rng.integers(12, 18, n_users),
                   np.where(comp == 1, rng.normal(30, 7, n_users), rng.normal(52, 11, n_users)))
    age = np.clip(np.round(age), 12, 85).astype(np.int64)
    age_group = np.searchsorted(np.asarray(AGE_EDGES), age, side="right")
    gender = rng.integers(0, 2, n_users)
    # occupation depends on age (students are young, the retired old)
    occ_p = np.full((n_users, len(OCCUPATIONS)), 1.0)
    stu, ret = OCCUPATIONS.index("student"), OCCUPATIONS.index("retired")
    occ_p[:, stu] = np.where(age < 23, 30.0, np.where(age < 30, 2.0, 0.1))
    occ_p[:, ret] = np.where(age >= 62, 25.0, np.where(age >= 55, 1.0, 0.0))
    occ_p /= occ_p.sum(axis=1, keepdims=True)
    occupation = (occ_p.cumsum(axis=1) > rng.random(n_users)[:, None]).argmax(axis=1)
    city = rng.integers(0, len(CITIES), n_users)

    eff = effect_tables(topics, seed)
    prior = rng.normal(0.0, 0.3, k)  # global topic appeal
    logits = (prior[None, :] + eff["age_group"][age_group] + eff["occupation"][occupation]
              + eff["gender"][gender] + rng.normal(0.0, taste_noise, (n_users, k)))
    end_logits = logits + rng.normal(0.0, drift, (n_users, k))
    taste_start = _softmax(logits / temperature)
    taste_end = _softmax(end_logits / temperature)

    users = pd.DataFrame({
        "user_id": [str(i) for i in range(1, n_users + 1)],
        "age": age,
        "gender": np.asarray(GENDERS)[gender],
        "occupation": np.asarray(OCCUPATIONS)[occupation],
        "city": np.asarray(CITIES)[city],
    })
    latent = {"taste_start": taste_start, "taste_end": taste_end, "age_group": age_group,
              "effects": eff}
    return users, latent


# --------------------------------------------------------------------------- items

_TITLE_TEMPLATES = (
    "The {Adj} {Noun}", "{Noun} of the {Place}", "The {Hero}'s {Noun}", "{Adj} {Place}",
    "Return of the {Hero}", "{Noun} and {Noun2}", "The Last {Hero}", "{Hero} in the {Place}",
)
_DESC_TEMPLATES = (
    "When a {adj} {hero} discovers a {noun} in the {place}, they must {verb} before it is "
    "too late.",
    "A {adj} story about a {hero} who sets out to {verb} the {noun}.",
    "In the {place}, a {hero} and a {hero2} {verb} to save the {noun}.",
    "Nobody in the {place} believes the {hero} can {verb} the {adj} {noun}.",
    "A {hero} haunted by a {noun} returns to the {place} to {verb} one last time.",
)
_DESC_EXTRA = (
    "Expect {adj} moments, a {noun2} and an unforgettable {hero2}.",
    "Critics call it a {adj} tale of {noun} and {noun2}.",
    "It follows the {hero2} through the {place2}.",
)


def _title_case(s: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in s.split(" "))


def _people(topic_idx: int, n: int, seed: int) -> list[str]:
    """A fixed pool of person names for one topic (directors / actors)."""
    r = _rng(seed, _S_ITEMS, 1000 + topic_idx)
    out: list[str] = []
    while len(out) < n:
        first = FIRST_NAMES[r.integers(len(FIRST_NAMES))]
        name = f"{first} {LAST_NAMES[r.integers(len(LAST_NAMES))]}"
        if name not in out:
            out.append(name)
    return out


def make_items(n_items: int, topics: tuple[Topic, ...], seed: int, zipf: float = 1.0,
               main_weight: float = 0.75, missing_image: float = 0.05,
               missing_video: float = 0.05) -> tuple[pd.DataFrame, dict]:
    """Item metadata, text, topic mixtures and popularity (media paths filled later)."""
    rng = _rng(seed, _S_ITEMS)
    k = len(topics)
    topic_p = rng.dirichlet(np.full(k, 8.0))  # a little unequal
    main = rng.choice(k, size=n_items, p=topic_p)
    rest = rng.dirichlet(np.full(k, 0.5), size=n_items)
    mix = (1.0 - main_weight) * rest
    mix[np.arange(n_items), main] += main_weight
    second_scores = mix.copy()
    second_scores[np.arange(n_items), main] = -1.0
    second = second_scores.argmax(axis=1)
    ranks = rng.permutation(n_items)
    popularity = 1.0 / (ranks + 1.0) ** zipf
    popularity /= popularity.sum()
    logp = np.log(popularity)
    quality = rng.normal(0.0, 0.35, n_items) + 0.15 * (logp - logp.mean()) / max(logp.std(), 1e-9)

    directors = [_people(t, 4, seed) for t in range(k)]
    actors = [_people(t, 14, seed) for t in range(k)]
    rows = []
    for i in range(n_items):
        t, s = topics[main[i]], topics[second[i]]

        def pick(attr: str, p_main: float = 0.85, t=t, s=s) -> str:
            src = t if rng.random() < p_main else s
            seq = getattr(src, attr)
            return seq[rng.integers(len(seq))]

        fill = {"Adj": _title_case(pick("adjectives", 0.95)),
                "Noun": _title_case(pick("nouns", 0.95)),
                "Noun2": _title_case(pick("nouns", 0.95)),
                "Place": _title_case(pick("places", 0.95)),
                "Hero": _title_case(pick("heroes", 0.95))}
        title = _TITLE_TEMPLATES[rng.integers(len(_TITLE_TEMPLATES))].format(**fill)
        if rng.random() < 0.06:
            title += " " + ("II", "III", "Returns")[rng.integers(3)]
        words = {"adj": pick("adjectives"), "hero": pick("heroes"), "hero2": pick("heroes"),
                 "noun": pick("nouns"), "noun2": pick("nouns"), "place": pick("places"),
                 "place2": pick("places"), "verb": pick("verbs")}
        desc = _DESC_TEMPLATES[rng.integers(len(_DESC_TEMPLATES))].format(**words)
        if rng.random() < 0.7:
            desc += " " + _DESC_EXTRA[rng.integers(len(_DESC_EXTRA))].format(**words)
        desc = desc[0].upper() + desc[1:]
        n_g = 1 + int(rng.random() < 0.6)
        genres = list(rng.choice(t.genres, size=min(n_g, len(t.genres)), replace=False))
        if rng.random() < 0.35 and s.genres[0] not in genres:
            genres.append(s.genres[0])
        pool = actors[main[i]]
        cast = [pool[j] for j in rng.choice(len(pool), size=int(rng.integers(2, 5)), replace=False)]
        extra = actors[second[i]][rng.integers(len(actors[second[i]]))]
        if extra not in cast:
            cast.append(extra)
        year = int(np.clip(round(rng.normal(*t.year)), 1930, 2024))
        rows.append((str(i + 1), title, desc, "|".join(genres), directors[main[i]][rng.integers(4)],
                     "|".join(cast), year))
    items = pd.DataFrame(rows, columns=["item_id", "title", "description", "genres", "director",
                                        "cast", "year"])
    has_image = rng.random(n_items) >= missing_image
    has_video = rng.random(n_items) >= missing_video
    latent = {"main": main, "mix": mix, "popularity": popularity, "quality": quality,
              "has_image": has_image, "has_video": has_video}
    return items, latent


# --------------------------------------------------------------------------- images


def _draw_image(topic: Topic, size: int, r: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image: the topic's palette/shape style with item-specific variation."""
    from PIL import Image, ImageDraw

    s = size
    top = np.asarray(topic.background[0], float) + r.normal(0, 12, 3)
    bot = np.asarray(topic.background[1], float) + r.normal(0, 12, 3)
    ramp = np.linspace(0.0, 1.0, s)[:, None, None]
    base = (top[None, None, :] * (1 - ramp) + bot[None, None, :] * ramp) * np.ones((1, s, 1))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    fg = [tuple(int(c) for c in np.clip(np.asarray(col) + r.normal(0, 15, 3), 0, 255))
          for col in topic.foreground]

    def col() -> tuple:
        return fg[int(r.integers(len(fg)))]

    def u(lo: float, hi: float) -> float:
        return float(r.uniform(lo, hi)) * s

    st = topic.style
    if st == "stars":
        for _ in range(int(r.integers(12, 22))):
            x, y = u(0, 1), u(0, 1)
            d.point([(x, y)], fill=fg[0])
            d.point([(x + 1, y)], fill=fg[0])
        cx, cy, rad = u(0.25, 0.75), u(0.25, 0.75), u(0.12, 0.22)
        d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=fg[2])
        d.ellipse([cx - 1.6 * rad, cy - 0.25 * rad, cx + 1.6 * rad, cy + 0.25 * rad], outline=fg[1])
    elif st == "hearts":
        for _ in range(int(r.integers(2, 5))):
            cx, cy, rad = u(0.2, 0.8), u(0.25, 0.75), u(0.07, 0.14)
            c = col()
            d.ellipse([cx - 2 * rad, cy - rad, cx, cy + rad], fill=c)
            d.ellipse([cx, cy - rad, cx + 2 * rad, cy + rad], fill=c)
            d.polygon([(cx - 2 * rad, cy + 0.2 * rad), (cx + 2 * rad, cy + 0.2 * rad),
                       (cx, cy + 2.4 * rad)], fill=c)
    elif st == "stripes":
        step, off, w = u(0.16, 0.24), u(0, 0.2), max(1, int(u(0.04, 0.08)))
        c = col()
        x = -s + off
        while x < 2 * s:
            d.line([(x, 0), (x + s, s)], fill=c, width=w)
            x += step
        d.rectangle([u(0.3, 0.45), u(0.3, 0.45), u(0.55, 0.7), u(0.55, 0.7)], outline=fg[2],
                    width=2)
    elif st == "circles":
        for _ in range(int(r.integers(5, 10))):
            cx, cy, rad = u(0, 1), u(0, 1), u(0.05, 0.14)
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=col())
    elif st == "mountains":
        horizon = u(0.45, 0.6)
        for _ in range(int(r.integers(2, 4))):
            cx, h, w = u(0, 1), u(0.25, 0.45), u(0.25, 0.45)
            d.polygon([(cx - w, horizon + 1), (cx, horizon - h), (cx + w, horizon + 1)], fill=fg[2])
            d.polygon([(cx - 0.2 * w, horizon - 0.8 * h), (cx, horizon - h),
                       (cx + 0.2 * w, horizon - 0.8 * h)], fill=fg[1])
        d.rectangle([0, horizon, s, s], fill=fg[0])
    elif st == "zigzag":
        n = int(r.integers(5, 9))
        pts_top = [(j * s / n, (0.12 if j % 2 else 0.0) * s + u(0, 0.06)) for j in range(n + 1)]
        pts_bot = [(j * s / n, s - (0.12 if j % 2 else 0.0) * s - u(0, 0.06)) for j in range(n + 1)]
        d.polygon([(0, 0)] + pts_top + [(s, 0)], fill=fg[1])
        d.polygon([(0, s)] + pts_bot + [(s, s)], fill=fg[1])
        cx, cy = u(0.3, 0.7), u(0.4, 0.6)
        for dx in (-0.1, 0.1):
            d.ellipse([cx + dx * s - 3, cy - 3, cx + dx * s + 3, cy + 3], fill=fg[0])
    elif st == "bands":
        y = u(0.55, 0.65)
        while y < s:
            h = u(0.05, 0.12)
            d.rectangle([0, y, s, y + h], fill=col() if r.random() < 0.5 else fg[0])
            y += h + u(0.02, 0.06)
        cx, cy, rad = u(0.2, 0.8), u(0.15, 0.35), u(0.08, 0.13)
        d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=fg[1])
    elif st == "bars":
        n = int(r.integers(5, 9))
        w = s / n
        for j in range(n):
            h = u(0.2, 0.85)
            d.rectangle([j * w + 1, s - h, (j + 1) * w - 2, s], fill=fg[j % len(fg)])
    elif st == "grid":
        step = u(0.18, 0.26)
        c = fg[0]
        v = u(0, 0.1)
        while v < s:
            d.line([(v, 0), (v, s)], fill=c, width=1)
            d.line([(0, v), (s, v)], fill=c, width=1)
            v += step
        cx, cy, rad = u(0.3, 0.7), u(0.3, 0.7), u(0.1, 0.16)
        d.polygon([(cx, cy - rad), (cx + rad, cy), (cx, cy + rad), (cx - rad, cy)], fill=fg[2])
    elif st == "rings":
        cx, cy = u(0.35, 0.65), u(0.35, 0.65)
        for j, rad in enumerate(np.sort(r.uniform(0.1, 0.42, int(r.integers(3, 5))))[::-1] * s):
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=fg[j % len(fg)],
                      width=max(1, s // 24))
    else:  # pragma: no cover - TOPICS only uses the styles above
        raise ValueError(f"unknown image style {st!r}")
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + r.integers(-6, 7, arr.shape, dtype=np.int16)  # item-specific pixel noise
    return np.clip(arr, 0, 255).astype(np.uint8)


def item_image(seed: int, item_index: int, topic: Topic, size: int) -> np.ndarray:
    """The image of item ``item_index`` (0-based), independent of every other item."""
    return _draw_image(topic, size, _rng(seed, _S_IMAGES, item_index))


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr, "RGB").save(path, format="PNG", compress_level=1)


# --------------------------------------------------------------------------- videos


def animate(image: np.ndarray, motion: str, n_frames: int, r: np.random.Generator) -> np.ndarray:
    """``n_frames`` RGB frames: ``image`` animated with a topic-specific motion."""
    from PIL import Image

    h, w, _ = image.shape
    pil = Image.fromarray(image, "RGB")
    out = np.empty((n_frames, h, w, 3), np.uint8)
    phase = float(r.uniform(0, 2 * np.pi))
    dark = r.random(n_frames) < 0.35  # flicker: dark frames, at least one
    dark[int(r.integers(n_frames))] = True
    for f in range(n_frames):
        t = f / max(n_frames - 1, 1)
        if motion == "pan":
            fr = np.roll(image, int(round(t * w * 0.5)), axis=1)
        elif motion == "tilt":
            fr = np.roll(image, int(round(t * h * 0.5)), axis=0)
        elif motion == "bounce":
            fr = np.roll(image, -int(round(abs(np.sin(np.pi * 2 * t + phase)) * h * 0.2)), axis=0)
        elif motion == "shake":
            fr = np.roll(image, (int(r.integers(-3, 4)), int(r.integers(-3, 4))), axis=(0, 1))
        elif motion in ("zoom_in", "zoom_out"):
            z = 1.0 + 0.5 * (t if motion == "zoom_in" else 1.0 - t)
            cw, ch = w / z, h / z
            box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
            fr = np.asarray(pil.resize((w, h), Image.BILINEAR, box=box))
        elif motion == "rotate":
            fr = np.asarray(pil.rotate(360.0 * t * 0.5, resample=Image.BILINEAR,
                                       fillcolor=tuple(int(c) for c in image[0, 0])))
        elif motion == "pulse":
            fr = np.clip(image * (0.75 + 0.25 * np.cos(2 * np.pi * t * 2 + phase)), 0, 255)
        elif motion == "flicker":
            fr = np.clip(image * (0.35 if dark[f] else 1.0), 0, 255)
        elif motion == "colour_shift":
            hsv = np.asarray(pil.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(t * 96)) % 256
            fr = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
        else:
            raise ValueError(f"unknown motion {motion!r}")
        out[f] = fr
    return out


def pick_video_codec() -> str:
    """'libx264' when the installed PyAV/FFmpeg can encode it, else 'mpeg4'."""
    import av

    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
        except (ValueError, av.error.FFmpegError):  # codec not compiled into this FFmpeg
            continue
        return name
    raise RuntimeError("PyAV has neither libx264 nor mpeg4 encoders")


def write_video(path: Path | str, frames: np.ndarray, fps: int = 8, codec: str = "libx264") -> None:
    """Encode RGB frames to an MP4 file (single-threaded: byte-deterministic)."""
    import av

    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"video frames must have even size for yuv420p, got {w}x{h}")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "threads": "1"} if codec == "libx264" \
            else {"threads": "1"}
        for fr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(fr),
                                                                    format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --------------------------------------------------------------------------- ratings


def _chunk_size(n_items: int) -> int:
    return int(max(1, min(2048, (1 << 22) // max(n_items, 1))))


def _activity(n_users: int, n_items: int, mean: float, seed: int, sigma: float = 0.8,
              min_n: int = 3) -> np.ndarray:
    """Heavy-tailed (log-normal) number of interactions per user, mean ~= ``mean``."""
    r = _rng(seed, _S_RATINGS, 0)
    mu = np.log(max(mean, 1e-9)) - sigma ** 2 / 2
    n = np.round(r.lognormal(mu, sigma, n_users)).astype(np.int64)
    cap = max(1, int(n_items * 0.8))
    return np.clip(n, min(min_n, cap), cap)


def _top_k_rows(keys: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row the indices of the ``k[row]`` largest keys (padded to max k) + validity mask."""
    kmax = int(k.max()) if len(k) else 0
    if kmax == 0:
        return np.zeros((keys.shape[0], 0), np.int64), np.zeros((keys.shape[0], 0), bool)
    idx = topk(keys, kmax)  # sorted by key; equal keys by the lower index on every CPU
    valid = np.arange(kmax)[None, :] < k[:, None]
    return idx, valid


def _weights(logpop: np.ndarray, aff: np.ndarray, beta: float) -> np.ndarray:
    """popularity**a * exp(beta * affinity), scaled per row so the maximum is 1 (float32)."""
    w = aff * np.float32(beta)
    w += logpop[None, :]
    w -= w.max(axis=1, keepdims=True)
    return np.exp(w, out=w)


def iter_ratings(n_items: int, taste_start: np.ndarray, taste_end: np.ndarray, mix: np.ndarray,
                 popularity: np.ndarray, quality: np.ndarray, n_per_user: np.ndarray, seed: int,
                 beta: float = 8.0, popularity_exponent: float = 0.8, rating_scale: float = 1.1,
                 rating_noise: float = 0.6):
    """Yield (user_index, item_index, rating, timestamp) numpy arrays, one user chunk at a time."""
    n_users = taste_start.shape[0]
    chunk = _chunk_size(n_items)
    logpop = (popularity_exponent * np.log(popularity)).astype(np.float32)
    mix32 = mix.astype(np.float32)
    user_rng = _rng(seed, _S_RATINGS, 1)
    user_bias = user_rng.normal(0.0, 0.35, n_users)
    start = T0 + user_rng.integers(0, HISTORY_WINDOW_S, n_users)
    span = np.clip(user_rng.lognormal(np.log(90 * 86_400), 1.0, n_users), 3600, 2 * 365 * 86_400)
    rows = np.arange(chunk)
    for c, lo in enumerate(range(0, n_users, chunk)):
        hi = min(lo + chunk, n_users)
        r = _rng(seed, _S_RATINGS, 100 + c)
        m = hi - lo
        n = n_per_user[lo:hi]
        n1 = (n + 1) // 2
        n2 = n - n1
        aff1 = taste_start[lo:hi].astype(np.float32) @ mix32.T  # (m, items)
        aff2 = taste_end[lo:hi].astype(np.float32) @ mix32.T
        # Gumbel top-k in multiplicative form: the k largest w / Exp(1) are a sample of k
        # items without replacement with probability proportional to w
        keys1 = _weights(logpop, aff1, beta)
        with np.errstate(divide="ignore"):  # Exp(1) == 0.0 is possible in float32: key inf, fine
            keys1 /= r.standard_exponential((m, n_items), dtype=np.float32)
        sel1, val1 = _top_k_rows(keys1, n1)
        del keys1
        keys2 = _weights(logpop, aff2, beta)
        with np.errstate(divide="ignore"):
            keys2 /= r.standard_exponential((m, n_items), dtype=np.float32)
        np.put_along_axis(keys2, sel1, np.where(val1, np.float32(-1.0),
                                                np.take_along_axis(keys2, sel1, 1)), 1)
        sel2, val2 = _top_k_rows(keys2, n2)
        del keys2
        # random order within each phase (top-k comes sorted by key)
        for sel, val in ((sel1, val1), (sel2, val2)):
            if sel.shape[1]:
                perm = np.argsort(np.where(val, r.random(sel.shape), np.inf), axis=1, kind="stable")
                sel[:] = np.take_along_axis(sel, perm, axis=1)
        sel = np.concatenate([sel1, sel2], axis=1)
        val = np.concatenate([val1, val2], axis=1)
        phase2 = np.concatenate([np.zeros_like(val1), np.ones_like(val2)], axis=1)
        urow = np.broadcast_to(rows[:m, None], sel.shape)
        items_flat = sel[val]
        urow_flat = urow[val]
        aff = np.where(phase2, np.take_along_axis(aff2, sel, 1),
                       np.take_along_axis(aff1, sel, 1))[val]
        # standardise affinity per user over the catalogue (phase taste)
        mu = np.where(phase2, aff2.mean(1)[:, None], aff1.mean(1)[:, None])[val]
        sd = np.where(phase2, aff2.std(1)[:, None], aff1.std(1)[:, None])[val] + 1e-9
        z = (aff - mu) / sd
        score = (3.0 + rating_scale * np.tanh(0.5 * z) * 2 + quality[items_flat]
                 + user_bias[lo + urow_flat] + r.normal(0.0, rating_noise, len(items_flat)))
        rating = np.clip(np.round(score), 1, 5).astype(np.int64)
        # timestamps: sorted uniform positions over the user's span, strictly increasing
        nmax = sel.shape[1]
        posv = np.arange(nmax)[None, :] < n[:, None]
        u = np.sort(np.where(posv, r.random((m, nmax)), np.inf), axis=1)
        offset = np.floor(np.where(posv, u, 0.0) * span[lo:hi, None]).astype(np.int64)
        ts = (start[lo:hi, None] + offset + np.arange(nmax)[None, :])[posv]
        yield ((lo + urow_flat).astype(np.int64), items_flat.astype(np.int64), rating,
               ts.astype(np.int64))


# --------------------------------------------------------------------------- writer


def _write_table(df: pd.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False, lineterminator="\n")


class _RatingsWriter:
    """Append rating chunks to a CSV (header once) or a parquet file (ParquetWriter)."""

    COLUMNS = ("user_id", "item_id", "rating", "timestamp")

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self._fh = None
        self._pq = None

    def __enter__(self) -> "_RatingsWriter":
        if self.fmt == "csv":
            self._fh = self.path.open("w", encoding="utf-8", newline="")
            self._fh.write(",".join(self.COLUMNS) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                      ("rating", pa.int64()), ("timestamp", pa.int64())])
            self._pq = pq.ParquetWriter(self.path, self._schema)
        return self

    def write(self, df: pd.DataFrame) -> None:
        if self._fh is not None:
            df.to_csv(self._fh, index=False, header=False, lineterminator="\n")
        else:
            import pyarrow as pa

            self._pq.write_table(pa.Table.from_pandas(df[list(self.COLUMNS)], schema=self._schema,
                                                      preserve_index=False))

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._pq is not None:
            self._pq.close()


def generate(out_dir: str | Path, n_users: int = 300, n_items: int = 200, seed: int = 0,
             interactions_per_user: float = 30.0, with_images: bool = True,
             with_videos: bool = True,
             image_size: int = 64, video_frames: int = 8, fps: int = 8, n_topics: int = 8,
             fmt: str = "csv", missing_image: float = 0.05, missing_video: float = 0.05,
             beta: float = 8.0, popularity_exponent: float = 0.8, zipf: float = 1.0,
             taste_noise: float = 0.8, drift: float = 0.6, video_codec: str | None = None,
             atomic: bool = True) -> dict:
    """Write the demo dataset to ``out_dir`` and return a summary dict.

    With ``atomic`` (default) the dataset is built in a temporary sibling directory
    and swapped into place at the end, so a failure leaves an older ``out_dir``
    intact; an existing ``out_dir`` is replaced as a whole.  Unlike
    :func:`pipelines.io.atomic_path` the files are not fsync'ed one by one: the
    dataset is regenerable and has thousands of media files (fsync dominated the
    run time).
    """
    if not 1 <= n_topics <= MAX_TOPICS:
        raise ValueError(f"n_topics must be in 1..{MAX_TOPICS}, got {n_topics}")
    if n_users < 1 or n_items < 1:
        raise ValueError("n_users and n_items must be >= 1")
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    if image_size < 8:
        raise ValueError("image_size must be >= 8")
    if with_videos and video_frames < 1:
        raise ValueError("video_frames must be >= 1")
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists():
        _check_replaceable(out_dir)  # fail before the work, not after
    if atomic:
        with _atomic_dir(out_dir) as tmp:
            summary = _generate_into(tmp, **_kw(locals()))
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = _generate_into(out_dir, **_kw(locals()))
    summary["out_dir"] = str(out_dir)
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    return summary


def _check_replaceable(target: Path) -> None:
    """Only an empty directory or an earlier demo dataset may be replaced."""
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if any(target.iterdir()) and not (target / "truth.json").is_file():
        raise FileExistsError(f"{target} is a non-empty directory that is not a demo dataset "
                              "(no truth.json); refusing to replace it")


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success swap it in place of ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp = tmp_root / target.name
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            _check_replaceable(target)
            os.replace(target, tmp_root / (target.name + ".old"))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _kw(loc: dict) -> dict:
    return {k: loc[k] for k in ("n_users", "n_items", "seed", "interactions_per_user",
                                "with_images",
                                "with_videos", "image_size", "video_frames", "fps", "n_topics",
                                "fmt", "missing_image", "missing_video", "beta",
                                "popularity_exponent", "zipf", "taste_noise", "drift",
                                "video_codec")}


def _generate_into(root: Path, *, n_users, n_items, seed, interactions_per_user, with_images,
                   with_videos, image_size, video_frames, fps, n_topics, fmt, missing_image,
                   missing_video, beta, popularity_exponent, zipf, taste_noise, drift,
                   video_codec) -> dict:
    topics = TOPICS[:n_topics]
    names = [t.name for t in topics]
    users, ul = make_users(n_users, topics, seed, taste_noise=taste_noise, drift=drift)
    items, il = make_items(n_items, topics, seed, zipf=zipf, missing_image=missing_image,
                           missing_video=missing_video)
    ids = items["item_id"].to_numpy()

    # media
    img_col = np.full(n_items, None, dtype=object)  # missing -> empty CSV field / parquet null
    vid_col = np.full(n_items, None, dtype=object)
    n_img = n_vid = 0
    codec = None
    if with_images:
        (root / "images").mkdir(exist_ok=True)
    if with_videos:
        (root / "videos").mkdir(exist_ok=True)
        codec = video_codec or pick_video_codec()
    vsize = image_size + image_size % 2
    for i in range(n_items if (with_images or with_videos) else 0):
        want_img = with_images and il["has_image"][i]
        want_vid = with_videos and il["has_video"][i]
        if not (want_img or want_vid):
            continue
        topic = topics[il["main"][i]]
        arr = item_image(seed, i, topic, image_size)
        if want_img:
            _write_png(root / "images" / f"{ids[i]}.png", arr)
            img_col[i] = f"images/{ids[i]}.png"
            n_img += 1
        if want_vid:
            base = arr if vsize == image_size else np.pad(arr, ((0, 1), (0, 1), (0, 0)),
                                                          mode="edge")
            frames = animate(base, topic.motion, video_frames, _rng(seed, _S_VIDEOS, i))
            write_video(root / "videos" / f"{ids[i]}.mp4", frames, fps=fps, codec=codec)
            vid_col[i] = f"videos/{ids[i]}.mp4"
            n_vid += 1
    items["image"] = img_col
    items["video"] = vid_col
    _write_table(users, root / f"users.{fmt}", fmt)
    _write_table(items, root / f"items.{fmt}", fmt)

    # ratings, streamed in user chunks
    n_per_user = _activity(n_users, n_items, interactions_per_user, seed)
    uids = users["user_id"].to_numpy()
    n_ratings = 0
    topic_hits = np.zeros((n_users, len(topics)), np.int64)
    gen = iter_ratings(n_items, ul["taste_start"], ul["taste_end"], il["mix"], il["popularity"],
                       il["quality"], n_per_user, seed, beta=beta,
                       popularity_exponent=popularity_exponent)
    path = root / f"ratings.{fmt}"
    with _RatingsWriter(path, fmt) as writer:
        for u, it, rt, ts in gen:
            np.add.at(topic_hits, (u, il["main"][it]), 1)
            n_ratings += len(u)
            writer.write(pd.DataFrame({"user_id": uids[u], "item_id": ids[it], "rating": rt,
                                       "timestamp": ts}))

    # truth
    taste_mean = (ul["taste_start"] + ul["taste_end"]) / 2
    top = np.argsort(-taste_mean, axis=1, kind="stable")[:, :3]
    eff = ul["effects"]
    truth = {
        "seed": seed,
        "topics": [{"name": t.name, "genres": list(t.genres), "words": list(t.words),
                    "style": t.style, "motion": t.motion,
                    "background": [list(c) for c in t.background],
                    "foreground": [list(c) for c in t.foreground]} for t in topics],
        "topic_names": names,
        "item_topic": {ids[i]: names[il["main"][i]] for i in range(n_items)},
        "item_topic_mix": {ids[i]: np.round(il["mix"][i], 4).tolist() for i in range(n_items)},
        "item_popularity": {ids[i]: float(f"{il['popularity'][i]:.6g}") for i in range(n_items)},
        "user_taste_start": dict(zip(uids, np.round(ul["taste_start"], 4).tolist())),
        "user_taste_end": dict(zip(uids, np.round(ul["taste_end"], 4).tolist())),
        "user_top_topics": {uids[u]: [names[j] for j in top[u]] for u in range(n_users)},
        "user_age_group": {uids[u]: AGE_GROUPS[ul["age_group"][u]] for u in range(n_users)},
        "age_groups": {"names": list(AGE_GROUPS), "edges": list(AGE_EDGES)},
        "attribute_effects": {
            "age_group": {g: dict(zip(names, np.round(eff["age_group"][j], 4).tolist()))
                          for j, g in enumerate(AGE_GROUPS)},
            "occupation": {o: dict(zip(names, np.round(eff["occupation"][j], 4).tolist()))
                           for j, o in enumerate(OCCUPATIONS)},
            "gender": {g: dict(zip(names, np.round(eff["gender"][j], 4).tolist()))
                       for j, g in enumerate(GENDERS)},
        },
        "params": {"n_users": n_users, "n_items": n_items,
                   "interactions_per_user": interactions_per_user,
                   "n_topics": n_topics, "beta": beta, "popularity_exponent": popularity_exponent,
                   "zipf": zipf, "taste_noise": taste_noise, "drift": drift,
                   "image_size": image_size, "video_frames": video_frames, "fps": fps},
    }
    (root / "truth.json").write_text(json.dumps(truth, sort_keys=True) + "\n", encoding="utf-8")
    top1_share = float(topic_hits[np.arange(n_users), top[:, 0]].sum() / max(n_ratings, 1))
    return {"n_users": n_users, "n_items": n_items, "n_ratings": int(n_ratings), "n_images": n_img,
            "n_videos": n_vid, "n_topics": n_topics, "topics": names, "format": fmt,
            "video_codec": codec, "seed": seed, "top1_topic_share": round(top1_share, 4)}


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset directory to (re)create")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interactions", type=float, default=30.0, help="mean interactions per user")
    p.add_argument("--topics", type=int, default=8,
                   help=f"number of latent topics (1..{MAX_TOPICS})")
    p.add_argument("--no-images", action="store_true")
    p.add_argument("--no-videos", action="store_true")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--video-frames", type=int, default=8)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    summary = generate(a.out, n_users=a.users, n_items=a.items, seed=a.seed,
                       interactions_per_user=a.interactions, with_images=not a.no_images,
                       with_videos=not a.no_videos, image_size=a.image_size,
                       video_frames=a.video_frames, fps=a.fps, n_topics=a.topics, fmt=a.format)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
