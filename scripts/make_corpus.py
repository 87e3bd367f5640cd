"""Writes tersor's calibration / evaluation corpus (python/tersor/data/corpus_{calibration,evaluation}.txt).

Every sentence is written for the project: hand-written sentences plus sentences built from hand-written
templates and word lists below (so the corpus is the project's own text, Apache-2.0 like the rest of the
repository; no outside source). Deterministic (seeded). The two splits share no sentence; they are drawn from
the same templates and lists, so the evaluation split measures held-out sentences of the same kind, not a
different domain. Run: python scripts/make_corpus.py [N_CALIBRATION N_EVALUATION]."""

from __future__ import annotations

import os
import random
import sys

PEOPLE = ["the teacher", "my neighbour", "the pilot", "a young engineer", "the old farmer", "our doctor", "the chef",
          "a tired student", "the mayor", "my grandmother", "the new manager", "a local artist", "the nurse",
          "the carpenter", "an astronomer", "the librarian", "my cousin", "the bus driver", "a journalist",
          "the gardener", "the referee", "a software developer", "the baker", "the captain", "a volunteer"]
NAMES = ["Anna", "Ravi", "Mateo", "Yuki", "Fatima", "Lars", "Chen", "Amara", "Olga", "Diego", "Priya", "Tom", "Leila",
         "Kofi", "Ingrid", "Hiro", "Sofia", "Omar", "Nina", "Pavel"]
PLACES = ["the harbour", "the city library", "a small village", "the train station", "the mountain hut",
          "the night market", "the old bridge", "the hospital", "the football stadium", "the university campus",
          "a quiet beach", "the botanical garden", "the airport", "the town square", "the factory floor",
          "the science museum", "a crowded cafe", "the desert road", "the river bank", "the server room"]
OBJECTS = ["a red umbrella", "the broken radio", "a heavy suitcase", "the garden hose", "an old map",
           "the spare key", "a bag of apples", "the laptop charger", "a wooden chair", "the winter coat",
           "a cup of tea", "the paint brushes", "a stack of letters", "the bicycle pump", "a box of tools",
           "the camera lens", "a loaf of bread", "the violin case", "a paper kite", "the first aid kit"]
TIMES = ["this morning", "last night", "on Sunday", "after lunch", "before sunrise", "in the spring",
         "during the storm", "every Friday", "at midnight", "yesterday afternoon", "next week", "in winter",
         "on the first day", "after the meeting", "late in the evening"]
VERBS_PAST = ["found", "repaired", "carried", "lost", "painted", "sold", "borrowed", "cleaned", "wrapped",
              "returned", "hid", "dropped", "measured", "photographed", "delivered"]
TOPICS = ["climate change", "the history of printing", "ocean currents", "machine learning", "ancient trade routes",
          "bird migration", "renewable energy", "the human immune system", "volcanic eruptions", "urban planning",
          "the theory of evolution", "medieval architecture", "deep sea creatures", "the stock market",
          "sleep and memory", "solar eclipses", "bread fermentation", "public transport", "coral reefs",
          "quantum computing", "language learning", "the water cycle", "earthquakes", "honey bees",
          "the printing press", "electric vehicles", "soil erosion", "glaciers", "vaccines", "chess openings"]
ADJ = ["surprising", "complicated", "fascinating", "controversial", "well documented", "poorly understood",
       "important", "simple", "expensive", "dangerous", "beautiful", "slow", "unexpected", "useful", "fragile"]
FOODS = ["lentil soup", "fresh bread", "grilled fish", "rice with beans", "a spicy curry", "apple pie",
         "vegetable stew", "pancakes", "noodles", "roasted potatoes", "a cheese sandwich", "mango salad"]
WEATHER = ["heavy rain", "strong winds", "thick fog", "a heat wave", "light snow", "clear skies", "a thunderstorm",
           "freezing temperatures", "a dry spell", "hail"]
TECH = ["the database", "the compiler", "the web server", "the neural network", "the sensor", "the battery",
        "the router", "the spreadsheet", "the printer", "the operating system", "the search engine", "the robot"]
PROBLEMS = ["crashed twice", "ran out of memory", "returned the wrong answer", "became very slow",
            "stopped responding", "overheated", "lost its settings", "printed garbage", "refused to start",
            "used too much power"]
QUESTIONS = ["How do I {v} {o}?", "Where can I buy {o}?", "Why is {t} so {a}?", "What causes {w} in {p}?",
             "Is it safe to eat {f} every day?", "When does {p} open?", "Who {vp} {o} {ti}?",
             "Can you explain {t} in simple words?", "What is the best way to learn about {t}?",
             "How long does it take to cook {f}?", "Why did {tech} {pr}?"]
VERBS = ["fix", "clean", "store", "replace", "carry", "wrap", "paint", "measure", "find"]

TEMPLATES = [
    "{P} {vp} {o} near {p} {ti}.",
    "{N} {vp} {o} {ti} and gave it to {pe}.",
    "{W} is expected near {p} {ti}.",
    "The lecture on {t} was {a} and drew a large crowd.",
    "{N} wrote a short essay about {t}.",
    "Scientists say that {t} is more {a} than most people think.",
    "We had {f} for dinner {ti}.",
    "{P} cooked {f} for everyone at {p}.",
    "After {w}, the road to {p} was closed for hours.",
    "{tech} {pr} {ti}, so {pe} restarted it.",
    "The report on {t} will be published {ti}.",
    "{N} and {N2} met at {p} {ti}.",
    "Nobody knew who had {vp} {o}.",
    "The museum opened a new exhibition about {t}.",
    "{P} explained {t} to a group of children.",
    "{N} forgot {o} at {p}.",
    "The weather forecast warns of {w} {ti}.",
    "It is {a} that {tech} {pr} again.",
    "A new book about {t} became a bestseller.",
    "{N} prefers {f} to {f2}.",
    "The students debated {t} for two hours.",
    "{P} found {o} under the bench at {p}.",
    "Because of {w}, the match at {p} was postponed.",
    "{tech} is {a}, but it works well most of the time.",
    "Most visitors to {p} come {ti}.",
    "{N} asked {pe} for help with {o}.",
    "The documentary about {t} was {a}.",
    "Engineers are still studying why {tech} {pr}.",
    "{P} walked from {p} to {p2} {ti}.",
    "Learning about {t} changed how {N} sees the world.",
]
HANDWRITTEN = """\
The quick brown fox jumps over the lazy dog.
Compressed weights can run faster than dense ones when decoding is cheap.
A lattice codebook quantizes eight weights at a time.
Paris is the capital of France.
The stock market fell sharply on Monday.
She plays the violin in the city orchestra.
Please remember to water the plants while I am away.
Electric cars are becoming more affordable every year.
A good night's sleep improves memory and concentration.
The river flooded the valley after days of heavy rain.
Our team won the championship after a close final match.
The recipe calls for two cups of flour and one egg.
He repaired the bicycle chain with a pair of pliers.
The library opens at nine and closes at five on weekdays.
Neural networks learn representations from large datasets.
The museum exhibits paintings from the eighteenth century.
Rain is expected across the northern region tomorrow afternoon.
Quantum computers use qubits instead of classical bits.
The train was late because of a signal failure.
My phone battery dies before the end of the day.
The children built a sandcastle that the tide washed away.
A cold wind blew across the empty parking lot.
The committee will vote on the proposal next Tuesday.
He apologised for missing the meeting.
The new bridge shortens the drive by twenty minutes.
Fresh basil makes the tomato sauce taste better.
The hikers reached the summit just before noon.
She translated the letter from Portuguese into English.
The price of coffee has doubled in two years.
Our cat sleeps on the windowsill all afternoon.
The orchestra tuned their instruments before the concert.
A single typo broke the entire build.
The farmer planted wheat in the north field.
Thousands of people marched through the city centre.
The moon looked unusually large last night.
The bakery sells out of croissants by eight.
He keeps his old letters in a shoebox.
The company announced record profits this quarter.
The firefighters rescued a dog from the burning house.
I need to renew my passport before the trip.
The lighthouse guided ships safely into the bay.
The toddler refused to eat anything green.
Solar panels cover the roof of the school.
The detective examined the footprints in the mud.
Traffic was light on the holiday morning.
The violinist practised the same passage for hours.
The old map showed a road that no longer exists.
Mountain goats climbed the steep rocky slope.
The team fixed the bug and shipped the release.
A sudden power cut plunged the street into darkness.
"""


def fill(t: str, rng: random.Random) -> str:
    c = rng.choice
    n1 = c(NAMES)
    n2 = c([n for n in NAMES if n != n1])
    f1 = c(FOODS)
    f2 = c([f for f in FOODS if f != f1])
    p1 = c(PLACES)
    p2 = c([p for p in PLACES if p != p1])
    s = t.format(P=c(PEOPLE).capitalize(), pe=c(PEOPLE), N=n1, N2=n2, p=p1, p2=p2, o=c(OBJECTS), ti=c(TIMES),
                 vp=c(VERBS_PAST), t=c(TOPICS), a=c(ADJ), f=f1, f2=f2, w=c(WEATHER), W=c(WEATHER).capitalize(),
                 tech=c(TECH), pr=c(PROBLEMS), v=c(VERBS))
    return s[0].upper() + s[1:]


def build(n_cal: int, n_eval: int, seed: int = 18) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    hand = [ln.strip() for ln in HANDWRITTEN.splitlines() if ln.strip()]
    seen = set(hand)
    made = []
    while len(made) < n_cal + n_eval - len(hand):
        t = rng.choice(TEMPLATES + QUESTIONS)
        s = fill(t, rng)
        if s not in seen:
            seen.add(s)
            made.append(s)
    rng.shuffle(made)
    # the hand-written sentences go to the evaluation split (they include the model bench's old SENTENCES)
    evaluation = hand + made[: n_eval - len(hand)]
    calibration = made[n_eval - len(hand):]
    return calibration, evaluation


def main(argv):
    n_cal, n_eval = (int(argv[0]), int(argv[1])) if len(argv) == 2 else (2000, 1000)
    cal, ev = build(n_cal, n_eval)
    assert not set(cal) & set(ev)
    out = os.path.join(os.path.dirname(__file__), "..", "python", "tersor", "data")
    for name, lines in (("calibration", cal), ("evaluation", ev)):
        with open(os.path.join(out, f"corpus_{name}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(name, len(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
